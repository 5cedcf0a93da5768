"""``python -m streams [roles...]``: the stream worker (what `somna worker stream` runs)."""

from streams.worker import main

main()
