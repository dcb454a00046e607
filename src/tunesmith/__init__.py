"""tunesmith: fine-tune pre-trained models on your own examples.

    import tunesmith
    result = tunesmith.train("configs/sentiment.yaml", optim__lr=3e-5)
    clf = tunesmith.load(result.run_dir)
    clf("a gripping, beautifully shot film")
"""

from tunesmith.api import RunResult, evaluate, export, load, serve, train, validate
from tunesmith.experiments import sweep, train_seeds
from tunesmith.config import Config, load_config
from tunesmith.errors import UserError

__version__ = "0.1.0"
__all__ = ["train", "train_seeds", "sweep", "validate", "evaluate", "load", "export", "serve", "load_config", "Config", "RunResult", "UserError", "__version__"]
