# `python -m kantai_batch` (and so `accelerate launch -m kantai_batch`) starts the same CLI.
from kantai_batch.cli import main

main()
