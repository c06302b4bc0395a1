"""Model registry: each model family file registers its builders by name."""
MODELS = {}  # name -> (builder, dataset)


def register_model(name, dataset):
    def wrap(fn):
        if name in MODELS:
            raise RuntimeError(f"model {name!r} registered twice")
        MODELS[name] = (fn, dataset)
        return fn

    return wrap


def model_names(dataset=None):
    return [n for n, (_, ds) in MODELS.items() if dataset is None or ds == dataset]
