"""The daemon's persistent state in SQLite or PostgreSQL (see :mod:`.db`), secrets sealed
with age.

Errors: :mod:`.errors` draws the tree (root :class:`StoreError`).
"""

from .db import API_KEY_PREFIX, UNSET, Store, hash_api_key, new_api_key
from .errors import (
    Conflict,
    ImageInUse,
    InvalidValue,
    NameTaken,
    NotFound,
    QuotaExceeded,
    SchemaError,
    SecretKeyError,
    StoreError,
    StoreUnavailable,
    UserHasSandboxes,
    VolumeInUse,
)
from .records import (
    ImageRecord,
    NewVolume,
    OnExpire,
    PublishRule,
    Quotas,
    Sandbox,
    SandboxConfig,
    SavedImageRecord,
    SecretInfo,
    Template,
    TemplateSpec,
    User,
    Volume,
    VolumeMount,
    check_labels,
    rfc3339,
)
from .schema import LATEST_VERSION, MIGRATIONS, migrate
from .secretbox import SecretBox

__all__ = [
    "API_KEY_PREFIX",
    "LATEST_VERSION",
    "MIGRATIONS",
    "UNSET",
    "Conflict",
    "ImageInUse",
    "ImageRecord",
    "InvalidValue",
    "NameTaken",
    "NewVolume",
    "NotFound",
    "OnExpire",
    "PublishRule",
    "QuotaExceeded",
    "Quotas",
    "Sandbox",
    "SandboxConfig",
    "SavedImageRecord",
    "SchemaError",
    "SecretBox",
    "SecretInfo",
    "SecretKeyError",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Template",
    "TemplateSpec",
    "User",
    "UserHasSandboxes",
    "Volume",
    "VolumeInUse",
    "VolumeMount",
    "check_labels",
    "hash_api_key",
    "migrate",
    "new_api_key",
    "rfc3339",
]
