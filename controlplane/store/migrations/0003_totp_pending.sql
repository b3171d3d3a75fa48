-- 0003: a TOTP secret being enrolled. It stays here, unused by login and
-- destructive-action checks, until the user proves their authenticator
-- holds it; then it moves to totp_secret.

ALTER TABLE users ADD COLUMN totp_pending TEXT NOT NULL DEFAULT '';
