"""The Flask blueprints, one per area, and their view helpers."""
