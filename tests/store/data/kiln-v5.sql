-- A kiln database at schema version 5 (SQLite), as the release before PostgreSQL support
-- wrote it (made with that release's Store; rows of every table). Secrets are absent:
-- they need the key file.
BEGIN TRANSACTION;
CREATE TABLE images (
                id TEXT PRIMARY KEY,
                owner TEXT REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                ref TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL CHECK (kind IN ('tier', 'packages', 'dockerfile', 'saved')),
                digest TEXT NOT NULL,
                size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
                definition TEXT NOT NULL DEFAULT '{}',
                created_at REAL NOT NULL
            ) STRICT;
INSERT INTO "images" VALUES('img-33b4fdb761bd',NULL,'py','kiln/py:1','packages','sha256:ab',5000000000,'{"packages": ["python3"]}',1700000007.0);
CREATE TABLE publish_rules (
                id TEXT PRIMARY KEY,
                sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
                port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
                alias TEXT NOT NULL UNIQUE,
                created_at REAL NOT NULL,
                UNIQUE (sandbox_id, port)
            ) STRICT;
INSERT INTO "publish_rules" VALUES('pub-202500f71f81','sb-old1',8080,'web',1700000003.0);
CREATE TABLE sandboxes (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                cpus INTEGER NOT NULL CHECK (cpus > 0),
                memory_mb INTEGER NOT NULL CHECK (memory_mb > 0),
                image TEXT NOT NULL,
                keep_hot INTEGER NOT NULL DEFAULT 0 CHECK (keep_hot IN (0, 1)),
                status TEXT NOT NULL,
                thermal TEXT NOT NULL,
                ip TEXT,
                engine TEXT NOT NULL,
                engine_state TEXT,
                spec TEXT NOT NULL DEFAULT '{}',
                created_at REAL NOT NULL,
                last_active_at REAL NOT NULL,
                deleted_at REAL
            , labels TEXT NOT NULL DEFAULT '{}', expires_at REAL, on_expire TEXT NOT NULL DEFAULT 'destroy'
                CHECK (on_expire IN ('destroy', 'stop'))) STRICT;
INSERT INTO "sandboxes" VALUES('sb-old1','u-82ef768a458c','box',2,1024,'minimal',0,'running','hot',NULL,'qemu','{"pid":7}','{"env":{"A":"1"},"idempotency":null,"init":null,"network":null,"runtime":null,"secrets":[],"template":null,"user":null,"volumes":[{"mount":"/data","name":"data"}],"workdir":null}',1700000002.0,1700000002.0,NULL,'{"team":"a"}',1800000000.0,'destroy');
INSERT INTO "sandboxes" VALUES('sb-old2','u-82ef768a458c','gone',1,512,'minimal',0,'running','hot',NULL,'docker',NULL,'{"env":{},"idempotency":null,"init":null,"network":null,"runtime":null,"secrets":[],"template":null,"user":null,"volumes":[],"workdir":null}',1700000004.0,1700000004.0,1700000005.0,'{}',NULL,'destroy');
CREATE TABLE saved_images (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                engine TEXT NOT NULL,
                tier TEXT NOT NULL,
                cpus INTEGER NOT NULL CHECK (cpus > 0),
                memory_mb INTEGER NOT NULL CHECK (memory_mb > 0),
                size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
                memory INTEGER NOT NULL CHECK (memory IN (0, 1)),
                source_id TEXT NOT NULL,
                spec TEXT NOT NULL DEFAULT '{}',
                created_at REAL NOT NULL,
                UNIQUE (user_id, name)
            ) STRICT;
INSERT INTO "saved_images" VALUES('si-old1','u-82ef768a458c','snap','qemu','minimal',2,1024,123456789,1,'sb-old1','{"env":{"A":"1"},"idempotency":null,"init":null,"network":null,"runtime":null,"secrets":[],"template":null,"user":null,"volumes":[{"mount":"/data","name":"data"}],"workdir":null}',1700000008.0);
CREATE TABLE secrets (
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                ciphertext BLOB NOT NULL,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                PRIMARY KEY (user_id, name)
            ) STRICT;
CREATE TABLE templates (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                spec TEXT NOT NULL,
                created_at REAL NOT NULL,
                UNIQUE (user_id, name)
            ) STRICT;
INSERT INTO "templates" VALUES('tpl-a5f9a654fe3f','u-82ef768a458c','tpl','{"cpus":2,"env":{},"image":null,"init":null,"memory_mb":1024,"volumes":[]}',1700000006.0);
CREATE TABLE users (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                key_hash TEXT NOT NULL UNIQUE,
                is_admin INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
                max_sandboxes INTEGER CHECK (max_sandboxes >= 0),
                max_cpus INTEGER CHECK (max_cpus >= 0),
                max_memory_mb INTEGER CHECK (max_memory_mb >= 0),
                created_at REAL NOT NULL
            , max_image_disk_mb INTEGER CHECK (max_image_disk_mb >= 0)) STRICT;
INSERT INTO "users" VALUES('u-82ef768a458c','old-admin','2c100b03f5925e7deafceef82d3f1abae2e59959b051617f78ef7f2381e5a0f9',1,5,NULL,NULL,1700000001.0,100);
CREATE TABLE volume_attachments (
                volume_id TEXT PRIMARY KEY REFERENCES volumes(id) ON DELETE CASCADE,
                sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
                mount TEXT NOT NULL,
                UNIQUE (sandbox_id, mount)
            ) STRICT;
INSERT INTO "volume_attachments" VALUES('vol-129eb452b034','sb-old1','/data');
CREATE TABLE volumes (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                size_mb INTEGER NOT NULL CHECK (size_mb > 0),
                path TEXT NOT NULL,
                created_at REAL NOT NULL,
                UNIQUE (user_id, name)
            ) STRICT;
INSERT INTO "volumes" VALUES('vol-129eb452b034','u-82ef768a458c','data',64,'/var/lib/kiln/volumes/data.ext4',1700000002.0);
CREATE UNIQUE INDEX sandboxes_live_name
                ON sandboxes(user_id, name) WHERE deleted_at IS NULL;
CREATE INDEX sandboxes_live_engine ON sandboxes(engine) WHERE deleted_at IS NULL;
CREATE INDEX sandboxes_live_expiry ON sandboxes(expires_at)
                WHERE deleted_at IS NULL AND expires_at IS NOT NULL;
CREATE UNIQUE INDEX images_owner_name ON images(COALESCE(owner, ''), name);
COMMIT;
PRAGMA user_version = 5;
