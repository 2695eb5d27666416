"""The command families of ``bob-cache``: one module per family, each exposing ``register(app)``.

``cli.py`` assembles them; nothing outside the face imports this package. Shared option
types, the error handling and the print helpers live in :mod:`bob_cache.commands.common`.
"""
