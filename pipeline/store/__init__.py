"""The run store: OUT's layout, lock, redo, run record, progress and atomic writes."""
