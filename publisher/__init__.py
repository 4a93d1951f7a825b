"""The publisher: fleet repository -> signed per-host releases in SFTP chroots, announced on MQTT."""
