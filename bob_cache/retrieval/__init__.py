"""Retrieval: FAISS index kinds, automatic choice under a memory budget, recall tuning,
query embedding, and retrieval metrics (class-based and Revisited Oxford/Paris protocols)."""
