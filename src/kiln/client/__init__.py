"""The Python SDK over kiln's REST API (``/api/v1``).

::

    import kiln

    with kiln.Client("http://127.0.0.1:8080", api_key="kiln_...") as client:
        job = client.jobs.submit("spec.yaml", data="wine.csv")  # uploads the table first
        job = client.jobs.wait(job["id"])
        bundle_dir = client.models.download("wine", dest="models")
        kiln.load(str(bundle_dir)).predict(rows)
        client.deployments.create("wine", model="wine")  # serve it
        client.deployments.predict("wine", rows)  # {predictions, probabilities, version, ...}
        client.usage(from_="2026-01-01", group_by="month")  # compute, bytes, predictions

Every method returns the JSON the server sent (plain dicts and lists), typed as the
``TypedDict`` of its shape in :mod:`kiln.client.shapes` (``JobOut``, ``PredictOut``,
``Page[DatasetOut]``, ...). Every error
response becomes the kiln error class of its code (``AuthError`` for 401,
``ForbiddenError`` for 403, ``NotFoundError``, ``SpecError`` with the field, ...);
an unreachable server or a response that is not kiln's JSON is a ``ServiceError``, and
so is a deployment that is overloaded (503, ``QueueFull``) or timed out (504,
``DeadlineExceeded``), with the server's code (``overloaded``, ``timeout``) as the
error's ``code``. Past a rate limit (429) the error is a ``RateLimitError``; it and
``QueueFull`` carry the server's ``Retry-After`` in seconds as ``retry_after``.
``FINAL_STATES`` is :data:`kiln.lifecycle.FINAL_STATES`, the job states nothing leaves.
Connection failures are retried (3 times) by httpx's transport.
"""

from kiln.client.groups import (
    BaseModels,
    Datasets,
    Deployments,
    Jobs,
    Keys,
    Models,
    Projects,
    Quotas,
)
from kiln.client.http import Client
from kiln.client.wire import JSON, Items, error_of, records
from kiln.lifecycle import FINAL_STATES

__all__ = [
    "FINAL_STATES",
    "JSON",
    "BaseModels",
    "Client",
    "Datasets",
    "Deployments",
    "Items",
    "Jobs",
    "Keys",
    "Models",
    "Projects",
    "Quotas",
    "error_of",
    "records",
]
