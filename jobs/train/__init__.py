"""``deepaudit train``: the command, its config and recipes, the Ray Train worker, the
training inputs and the crop cache."""
