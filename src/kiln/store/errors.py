"""Errors raised by the store (it raises only these; the database driver's are translated).

StoreError                   root
├── NotFound                 no such user/sandbox/template/secret/volume/rule (HTTP 404)
├── Conflict                 the change clashes with existing rows (HTTP 409)
│   ├── NameTaken            a name/alias/port already used where it must be unique
│   ├── VolumeInUse          a volume attached to a live sandbox
│   ├── ImageInUse           an image a live sandbox runs
│   └── UserHasSandboxes     deleting a user who still has live sandboxes
├── QuotaExceeded            a user's quota forbids the request (HTTP 403)
├── InvalidValue             a value that cannot be stored (wrong type, not JSON-able)
├── SchemaError              not a kiln database, newer than this code, bad stored data
├── StoreUnavailable         the database server cannot be reached (HTTP 503)
└── SecretKeyError           the secret key file is missing, unsafe or does not fit
"""

from __future__ import annotations


class StoreError(Exception):
    """Root of every error the store raises."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class NameTaken(Conflict):
    pass


class VolumeInUse(Conflict):
    pass


class ImageInUse(Conflict):
    """The image cannot be deleted: a live sandbox runs it."""


class UserHasSandboxes(Conflict):
    pass


class QuotaExceeded(StoreError):
    pass


class InvalidValue(StoreError, ValueError):
    pass


class SchemaError(StoreError):
    pass


class StoreUnavailable(StoreError):
    """The database server is down or unreachable (PostgreSQL); the next call retries."""


class SecretKeyError(StoreError):
    pass
