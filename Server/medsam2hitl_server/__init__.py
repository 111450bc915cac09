"""The MedSAM2HITL inference service: a FastAPI jobs API feeding Celery model workers through Redis.

The model, volume loading, windows and export all come from MedSAM2HITLLib; this package only adds the
HTTP edge, the job records in Redis and the worker tasks.
"""

__version__ = "0.1.0"
