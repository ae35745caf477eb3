"""pathapi: share files between works by writing ``lit://`` in front of a path.

Built on :mod:`cas`: a Path resolves to a manifest at its origin; ``get`` moves only the
chunks the receiver lacks and never writes an unverified byte into a user's file.
"""

from .drive import Drive
from .errors import (
    AuthenticationError,
    ClusterError,
    DriveAmbiguousError,
    DriveDuplicateError,
    DriveFileNotFoundError,
    DriveNameError,
    DriveTimeoutError,
    LitPathError,
    OlderVersionError,
    OriginError,
    OriginUnreachableError,
    PathapiError,
    TransferError,
    WorkError,
)
from .path import Path
from .runtime.app import App
from .runtime.cluster import SharedFolder
from .runtime.compute import CloudCompute, Compute
from .runtime.flow import Flow
from .runtime.work import Work
from .transfer import TransferRecord

# Aliases, so code written for the original API runs with only its imports changed.
LightningWork = Work
LightningFlow = Flow
LightningApp = App

__all__ = [
    "App", "AuthenticationError", "CloudCompute", "ClusterError", "Compute", "Drive", "DriveAmbiguousError",
    "DriveDuplicateError", "DriveFileNotFoundError", "DriveNameError", "DriveTimeoutError", "Flow", "LightningApp",
    "LightningFlow", "LightningWork", "LitPathError", "OlderVersionError", "OriginError", "OriginUnreachableError",
    "Path", "PathapiError", "SharedFolder", "TransferError", "TransferRecord", "Work", "WorkError",
]
