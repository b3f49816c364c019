"""MLflow models-from-code entry of a saved ToxicityFilter: the model folder holds no pickled Python object."""

from mlflow.models import set_model

from saefeat.detox.filter import ToxicityFilterModel

set_model(ToxicityFilterModel())
