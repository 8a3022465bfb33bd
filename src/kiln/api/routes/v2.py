"""KServe v2 / Open Inference Protocol endpoints; the deployment name is the model name.

Errors on these routes use the protocol's own shape, ``{"error": "<message>"}``, which
standard v2 clients read.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from kiln.api.routes.deployments import InferenceProject, Manager
from kiln.serve import v2

router = APIRouter(prefix="/v2", tags=["KServe v2"])


@router.get("/health/live", name="v2.live")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", name="v2.ready")
def ready(deployments: Manager) -> dict[str, bool]:
    return {"ready": deployments.ready()}


@router.get("/models/{name}", name="v2.metadata")
def metadata(name: str, project_id: InferenceProject, deployments: Manager) -> dict[str, Any]:
    live = deployments.classic(project_id, name)  # a language model: 409 naming /v1
    route = live.pick()
    return v2.metadata(name, [r.version for r in live.routes], route.batcher.model)


@router.get("/models/{name}/ready", name="v2.model_ready")
def model_ready(
    name: str, project_id: InferenceProject, deployments: Manager
) -> dict[str, str | bool]:
    live = deployments.get(project_id, name)
    return {"name": name, "ready": live.state.value == "ready"}


@router.post("/models/{name}/infer", name="v2.infer")
async def infer(
    name: str, request: Request, project_id: InferenceProject, deployments: Manager
) -> dict[str, Any]:
    started = time.perf_counter()
    body = v2.parse_body(
        await request.body(), request.headers.get("inference-header-content-length")
    )
    live = deployments.classic(project_id, name)  # a language model: 409 naming /v1
    rows, matrix = v2.to_rows_or_matrix(body, live.pick().batcher.model)
    output, version = await deployments.predict(project_id, name, rows, matrix=matrix)
    deployments.metrics.total.labels(live.project, name).observe(time.perf_counter() - started)
    request.state.served_version = version
    return v2.response(name, version, output, body)
