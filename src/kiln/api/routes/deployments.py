"""Deployments (scope ``deploy``) and predictions (scope ``predict``)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from kiln.api.deps import Deployer, ProjectAlone, Reader, principal
from kiln.api.schemas import DeploymentIn, DeploymentOut, DeploymentPatch, PredictIn, PredictOut
from kiln.serve.deployments import DeploymentChange, DeploymentManager, Live, NewDeployment
from kiln.services import Services
from kiln.store.deployments import DeploymentConfig, RouteSpec
from kiln.store.keys import Principal
from kiln.store.projects import project_for

router = APIRouter(tags=["deployments"])


async def manager(request: Request) -> DeploymentManager:
    deployments: DeploymentManager = request.app.state.deployments
    return deployments


Manager = Annotated[DeploymentManager, Depends(manager)]


def deployment_out(live: Live) -> DeploymentOut:
    return DeploymentOut(
        name=live.name,
        model=live.model,
        task=live.task,
        state=live.state.value,
        error=live.error,
        routes=[
            {
                "version": r.version,
                "weight": r.weight,
                "backend": r.backend_name,
                "queue_depth": r.depth,
            }
            for r in live.routes
        ],
        **live.config.model_dump(),
    )


@router.post("/deployments", status_code=201, name="deployments.create")
async def create(
    body: DeploymentIn,
    _who: Deployer,
    project: ProjectAlone,
    deployments: Manager,
    request: Request,
) -> DeploymentOut:
    """Load the version, warm it up and answer once it is ready."""
    request.state.audit_target = f"deployment:{body.name}"
    spec = NewDeployment(
        name=body.name,
        model=body.model,
        version=body.version,
        config=DeploymentConfig.model_validate(body, from_attributes=True),
    )
    return deployment_out(await deployments.create(project, spec))


@router.get("/deployments", name="deployments.list")
def list_(_who: Reader, project: ProjectAlone, deployments: Manager) -> list[DeploymentOut]:
    return [deployment_out(d) for d in deployments.of_project(project.id)]


@router.get("/deployments/{name}", name="deployments.get")
def get(name: str, _who: Reader, project: ProjectAlone, deployments: Manager) -> DeploymentOut:
    return deployment_out(deployments.get(project.id, name))


@router.patch("/deployments/{name}", name="deployments.update")
async def update(
    name: str,
    body: DeploymentPatch,
    _who: Deployer,
    project: ProjectAlone,
    deployments: Manager,
    request: Request,
) -> DeploymentOut:
    """Hot swap (``version``), canary or rollback (``routes``), or batching settings.

    New versions load beside the old ones; traffic switches once they are warm.
    """
    request.state.audit_target = f"deployment:{name}"
    change = DeploymentChange(
        version=body.version,
        routes=None
        if body.routes is None
        else [RouteSpec(r.version, r.weight) for r in body.routes],
        backend=body.backend,
        max_batch_size=body.max_batch_size,
        max_delay_ms=body.max_delay_ms,
        max_queue=body.max_queue,
        timeout_ms=body.timeout_ms,
    )
    return deployment_out(await deployments.update(project, name, change))


@router.delete("/deployments/{name}", status_code=204, name="deployments.delete")
async def delete(
    name: str, _who: Deployer, project: ProjectAlone, deployments: Manager, request: Request
) -> Response:
    request.state.audit_target = f"deployment:{name}"
    await deployments.delete(project, name)
    return Response(status_code=204)


async def inference_project(
    request: Request, project: Annotated[str | None, Query()] = None
) -> int:
    """The caller's project for inference (no database read, nor thread, for a project
    key). The key is checked here rather than through sub-dependencies: each one costs
    FastAPI more than the check itself."""
    svc: Services = request.app.state.services
    who = await principal(request, svc)
    who.require("predict")
    if who.project_id is not None and project is None:
        request.state.served_project = who.project  # the metrics' project label
        return who.project_id
    project_id, request.state.served_project = await run_in_threadpool(_project, svc, who, project)
    return project_id


def _project(svc: Services, who: Principal, project: str | None) -> tuple[int, str]:
    with svc.db.session() as s:
        row = project_for(s, who, project)
        return row.id, row.name


InferenceProject = Annotated[int, Depends(inference_project)]


@router.post("/deployments/{name}/predict", name="deployments.predict")
async def predict(
    name: str,
    body: PredictIn,
    project_id: InferenceProject,
    deployments: Manager,
    request: Request,
) -> PredictOut:
    """Rows in, predictions out; the reply names the version that answered."""
    started = time.perf_counter()
    output, version = await deployments.predict(project_id, name, body.inputs)
    live = deployments.get(project_id, name)
    deployments.metrics.total.labels(live.project, name).observe(time.perf_counter() - started)
    request.state.served_version = version
    return PredictOut(
        predictions=output.predictions,
        probabilities=output.probabilities,
        labels=output.labels,
        model=live.model,
        version=version,
    )


@router.get("/deployments/{name}/drift", name="deployments.drift")
def drift(name: str, _who: Reader, project: ProjectAlone, deployments: Manager) -> dict[str, Any]:
    """Input drift of the recent rows (``KILN_DRIFT_WINDOW``) against the training data of
    the deployment's main version: ``{rows, threshold, version, reference, columns:
    {name: {psi, drifted}}, drifted: [names]}``. A version trained before bundles kept
    reference statistics has ``reference: false`` and a ``message``."""
    return deployments.drift(project.id, name)


@router.get("/deployments/{name}/predictions", name="deployments.predictions")
def predictions(
    name: str,
    _who: Reader,
    project: ProjectAlone,
    deployments: Manager,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The newest records of the prediction log, newest first (a sample of the requests,
    ``KILN_PREDICTION_LOG_SAMPLE``): ``{items: [{time, version, inputs, predictions,
    probabilities?, labels?}], sample, full, ...}``."""
    return deployments.predictions(project.id, name, limit)
