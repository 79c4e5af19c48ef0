"""What makes a run, on top of the library: run folders (lock, manifest, resume and overwrite rules) and
the process group as a run sees it."""
