"""Qt-free core of the MedSAM2HITL Slicer extension: engine, worker, MRML logic and CLI.

Importing this package is cheap: torch, sam2 and Slicer are imported only by the modules that need them,
and only when their functions run.
"""

__version__ = "0.1.0"
