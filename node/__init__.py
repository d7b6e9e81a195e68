"""The crdtmerge replica node: a FastAPI service over the library (``node.app.create_app``).

Nothing is built at import time; run it with ``crdtmerge node`` or ``python -m node``.
"""
