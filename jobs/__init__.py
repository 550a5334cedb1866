"""jobs: the `refseg` command line and the entry points that `ray job submit` runs."""
