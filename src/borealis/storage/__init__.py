"""The storage node: WAL segments on disk, appends from the volume client, a WAL sender
for hot standbys, peer repair and a background scrub."""
