"""Fine-tuning: data for detection and segmentation, the models built over a backbone's
feature pyramid, training mechanics and the metrics scored with pycocotools or numpy."""
