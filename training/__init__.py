"""Training: the config and recipes (:mod:`.config`), the labelled inputs (:mod:`.datasets`)
and their crop cache (:mod:`.crop_cache`), the Ray Train worker (:mod:`.worker`: the
frame phase :mod:`.phase1` and the sequence phase :mod:`.phase2` over :mod:`.loop`), the
driver (:mod:`.run`) and the fused recipe (:mod:`.fused`, :mod:`.clip_features`). The
command is ``jobs/train_cmd.py``."""
