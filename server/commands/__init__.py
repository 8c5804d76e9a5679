"""Commands to running trainers: kinds and validation, storage, live delivery, autopilot policies."""
