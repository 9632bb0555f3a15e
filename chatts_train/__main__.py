"""`python -m chatts_train [train options]`: the training job, as launch.sh starts it on every rank."""
from .training.loop import main

main()
