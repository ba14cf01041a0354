"""procshare's command line (`python -m procshare`) and its demo scenes."""
