"""MLflow "models from code" entry: MLflow runs this file to build a logged model's pyfunc, so the
logged model holds code, not a pickle (loading a pickle can execute arbitrary code)."""

from mlflow.models import set_model

from bigmodel.serving import BigmodelPyfunc

set_model(BigmodelPyfunc())
