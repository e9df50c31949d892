"""The review station (`blastq serve`): pages and a JSON API over the workers' database and store.

Pages are Jinja2 templates with a little JavaScript (static/review.js) that calls the same JSON API a
script can (its OpenAPI schema at /api/openapi.json). Nothing but /healthz answers without a signed-in
user: the API answers 401, a page sends to /login. No URL names a file: images are found through the
result rows (their store prefix), never through a path taken from the request.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field
from starlette.middleware.sessions import SessionMiddleware

from blastq.core.adapters import (
    SAMPLE_STATES,
    ObjectStore,
    SampleReview,
    Settings,
    User,
    amend,
    audit_trail,
    authenticate,
    complete_review,
    connect,
    job_counts,
    list_users,
    lone_images,
    note_in_audit,
    reclassify,
    result_prefix,
    review_alone,
    sample_name,
    sample_review,
    sign_off,
    stats_dict,
    store_from_settings,
    worklist,
)
from blastq.core.cells import CELL_TYPES, REVIEW_CLASSES, CellGallery
from blastq.core.common import BlastqError, NotAllowed, NotFound, ReviewConflict, StoreUnavailable
from blastq.core.outputs import png_bytes, read_gallery
from blastq.web.auth import (
    CSRF_HEADER,
    check_csrf,
    csrf_token,
    current_user,
    require,
    session_key,
    sign_in,
)
from blastq.web.lis import cells_csv, hl7_message
from blastq.worker.metrics import QueueCollector

HERE = Path(__file__).parent
# One key per class in the gallery, as on a differential counter's keypad.
CLASS_KEYS = {
    "neutrophil": "n",
    "lymphocyte": "l",
    "monocyte": "m",
    "eosinophil": "e",
    "basophil": "b",
    "blast": "x",
    "unidentified": "u",
    "smudge": "s",
    "artefact": "a",
}
Me = Annotated[User, Depends(current_user)]
# Cells shown per class on a sample's page: a whole slide has tens of thousands; the figures count them
# all, and the API reclassifies any of them.
GROUP_SHOWN = 500


class Reclassify(BaseModel):
    cells: list[str] = Field(min_length=1, max_length=5000, description='cells as "<result id>-<cell id>"')
    to: str = Field(description=f"the new class: one of {', '.join(REVIEW_CLASSES)}")


class Amendment(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


class Gallery:
    """Gallery sheets read from the store, decoded once and kept for the next crops of the same image."""

    def __init__(self, store: ObjectStore, keep: int = 16):
        self.store = store
        self.sheet = lru_cache(maxsize=keep)(self._sheet)

    def _sheet(self, prefix: str) -> CellGallery:
        gallery = read_gallery(self.store, prefix)
        if gallery is None:  # raised, not returned: a gallery written later is then read, not a cached None
            raise LookupError(prefix)
        return gallery

    def crop_png(self, prefix: str, cell_id: int) -> bytes | None:
        """The cell's crop as PNG; None when the image has no gallery or the cell is not in it."""
        try:
            crop = self.sheet(prefix).crop(cell_id)
        except LookupError:
            return None
        return None if crop is None else png_bytes(crop.rgb)


def create_app(settings: Settings, *, db=None, store: ObjectStore | None = None) -> FastAPI:
    """The review station over these settings' database and store."""
    app = FastAPI(
        title="blastq review station",
        version="1",
        openapi_url=None,  # served below, behind sign-in
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.db = db if db is not None else connect(settings.database_url.get_secret_value())
    app.state.store = store if store is not None else store_from_settings(settings)
    app.state.gallery = Gallery(app.state.store)
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_key(settings),
        session_cookie="blastq_session",
        max_age=int(settings.session_hours * 3600),
        same_site="strict",
        https_only=False,  # behind a TLS proxy set it there; a lab's loopback install has no TLS
    )
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(CLASS_KEYS=CLASS_KEYS, REVIEW_CLASSES=REVIEW_CLASSES, CELL_TYPES=CELL_TYPES)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def page(request: Request, name: str, user: User | None, **context) -> HTMLResponse:
        return templates.TemplateResponse(
            request, name, {"user": user, "csrf": csrf_token(request), "csrf_header": CSRF_HEADER, **context}
        )

    def name_of(sample_id: int) -> str:
        return sample_name(app.state.db, sample_id)

    def review_of(sample_id: int) -> SampleReview:
        return sample_review(app.state.db, name_of(sample_id))

    # --- errors: the API answers JSON, pages send strangers to the login page -------------------------

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 401 and not request.url.path.startswith("/api/"):
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(BlastqError)
    async def blastq_error(request: Request, exc: BlastqError):
        status = {NotFound: 404, ReviewConflict: 409, NotAllowed: 403}.get(type(exc), 400)
        if isinstance(exc, StoreUnavailable):
            status = 503
        return JSONResponse({"detail": exc.reason}, status_code=status)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    # --- unauthenticated ---------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        """Liveness: the process answers."""
        return PlainTextResponse("ok")

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> PlainTextResponse:
        """Readiness: the database answers (every page needs it)."""
        try:
            job_counts(app.state.db)
        except BlastqError as exc:
            return PlainTextResponse(f"not ready: {exc}", status_code=503)
        return PlainTextResponse("ready")

    metrics_registry = CollectorRegistry()
    metrics_registry.register(QueueCollector(app.state.db))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus: the jobs in the database (blastq_jobs, the oldest queued job's wait, database up)."""
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        return page(request, "login.html", None, next=_local(next), error="")

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request,
        username: Annotated[str, Form(max_length=64)],
        password: Annotated[str, Form(max_length=1024)],
        csrf: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/",
    ):
        check_csrf(request, csrf)
        user = authenticate(app.state.db, username, password)
        if user is None:
            response = page(request, "login.html", None, next=_local(next), error="Wrong name or password.")
            response.status_code = 401
            return response
        sign_in(request, user)
        return RedirectResponse(_local(next), status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf: Annotated[str, Form()] = ""):
        check_csrf(request, csrf)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- pages -------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def worklist_page(
        request: Request,
        me: Me,
        state: str = "",
        batch: str = "",
        since: str = "",
    ) -> HTMLResponse:
        entries = _worklist(state, batch, since)
        return page(
            request,
            "worklist.html",
            me,
            entries=entries,
            lone=lone_images(app.state.db),
            states=SAMPLE_STATES,
            state=state,
            batch=batch,
            since=since,
        )

    @app.get("/fragments/worklist", include_in_schema=False)
    def worklist_rows(
        request: Request, me: Me, state: str = "", batch: str = "", since: str = ""
    ) -> HTMLResponse:
        return page(request, "worklist_rows.html", me, entries=_worklist(state, batch, since))

    def _worklist(state: str, batch: str, since: str):
        when = _date(since)
        return worklist(app.state.db, state=state or None, batch_id=batch or None, since=when)

    @app.get("/samples/{sample_id}", include_in_schema=False)
    def sample_page(request: Request, sample_id: int, me: Me) -> HTMLResponse:
        review = review_of(sample_id)
        return page(
            request,
            "sample.html",
            me,
            review=review,
            before=review.before(),
            after=review.after(),
            audit=audit_trail(app.state.db, review.state.sample),
            groups=class_groups(review),
            sample_id=sample_id,
        )

    @app.get("/samples/{sample_id}/report", include_in_schema=False)
    def report_page(request: Request, sample_id: int, me: Me) -> HTMLResponse:
        review = review_of(sample_id)
        return page(
            request,
            "report.html",
            me,
            review=review,
            before=review.before(),
            after=review.after(),
            printed=datetime.now(UTC),
            names={u.username: u.full_name for u in list_users(app.state.db)},
        )

    @app.get("/results/{result_id}/view", include_in_schema=False)
    def slide_page(
        request: Request, result_id: int, me: Me, sample: int, cell: int | None = None
    ) -> HTMLResponse:
        review = review_of(sample)
        image = next((i for i in review.images if i.result_id == result_id), None)
        if image is None:
            raise NotFound(f"result {result_id} is not an image of sample {sample}", value=result_id)
        cells = [c for c in review.cells if c.result_id == result_id]
        return page(
            request, "slide.html", me, review=review, image=image, cells=cells, cell=cell, sample_id=sample
        )

    # --- files, found through rows -------------------------------------------------------------------

    @app.get("/results/{result_id}/overlay.png", include_in_schema=False)
    def overlay(result_id: int, me: Me) -> Response:
        prefix = _prefix(result_id)
        try:
            data = app.state.store.get(f"{prefix}/overlay.png")
        except (FileNotFoundError, KeyError) as exc:
            raise HTTPException(404, "no overlay for this result") from exc
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/cells/{result_id}/{cell_id}.png", include_in_schema=False)
    def cell_crop(result_id: int, cell_id: int, me: Me) -> Response:
        data = app.state.gallery.crop_png(_prefix(result_id), cell_id)
        if data is None:
            raise HTTPException(404, "no crop of this cell (recorded before galleries, or a whole slide)")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    def _prefix(result_id: int) -> str:
        return result_prefix(app.state.db, result_id)

    @app.get("/samples/{sample_id}/cells.csv", include_in_schema=False)
    def download_csv(sample_id: int, me: Me) -> Response:
        review = review_of(sample_id)
        return _download(cells_csv(review), "text/csv", f"{review.state.sample}-cells.csv")

    @app.get("/samples/{sample_id}/oru.hl7", include_in_schema=False)
    def download_hl7(sample_id: int, me: Me) -> Response:
        review = review_of(sample_id)
        return _download(hl7_message(review).encode(), "application/hl7-v2", f"{review.state.sample}.hl7")

    # --- the JSON API ------------------------------------------------------------------------------

    @app.get("/api/openapi.json", tags=["meta"])
    def openapi(me: Me) -> JSONResponse:
        """This API's OpenAPI schema."""
        return JSONResponse(app.openapi())

    @app.get("/api/me", tags=["meta"])
    def whoami(me: Me) -> dict:
        """The signed-in user and what their role allows."""
        from blastq.core.adapters import PERMISSIONS

        return {
            "username": me.username,
            "full_name": me.full_name,
            "role": me.role,
            "may": sorted(PERMISSIONS[me.role]),
        }

    @app.get("/api/samples", tags=["samples"])
    def api_samples(
        me: Me,
        state: Annotated[str, Query(description=f"one of {', '.join(SAMPLE_STATES)}")] = "",
        batch: str = "",
        since: Annotated[str, Query(description="YYYY-MM-DD or an ISO time: updated since")] = "",
    ) -> list[dict]:
        """The worklist: flagged and insufficient-cell samples first."""
        return [_entry_dict(e) for e in _worklist(state, batch, since)]

    @app.get("/api/samples/{sample_id}", tags=["samples"])
    def api_sample(sample_id: int, me: Me) -> dict:
        """A sample in review: state, figures before and after review, every cell."""
        return _review_dict(review_of(sample_id))

    @app.get("/api/images", tags=["samples"])
    def api_lone_images(me: Me) -> list[dict]:
        """Recorded images in no sample (run or submitted without --sample), newest first, flagged first."""
        return [{**i.__dict__, "created_at": i.created_at.isoformat()} for i in lone_images(app.state.db)]

    @app.post("/api/images/{result_id}/review", tags=["review"])
    def api_review_alone(result_id: int, request: Request, me: Me) -> dict:
        """Put an image in a sample of its own to review it; returns that sample (the same one again on a
        second call)."""
        _changing(request, me, "reclassify")
        name = review_alone(app.state.db, result_id)
        return _review_dict(sample_review(app.state.db, name))

    @app.post("/api/samples/{sample_id}/reclassify", tags=["review"])
    def api_reclassify(sample_id: int, body: Reclassify, request: Request, me: Me) -> dict:
        """Give cells a new class; the figures come back recomputed."""
        _changing(request, me, "reclassify")
        cells = [_cell_key(k) for k in body.cells]
        return _review_dict(reclassify(app.state.db, name_of(sample_id), cells, body.to, me.username))

    @app.post("/api/samples/{sample_id}/complete", tags=["review"])
    def api_complete(sample_id: int, request: Request, me: Me) -> dict:
        """A technologist has reviewed every cell: the sample waits for sign-off."""
        _changing(request, me, "complete")
        return _review_dict(complete_review(app.state.db, name_of(sample_id), me.username))

    @app.post("/api/samples/{sample_id}/sign-off", tags=["review"])
    def api_sign_off(sample_id: int, request: Request, me: Me) -> dict:
        """A pathologist (not the one who completed it) signs off; the result is locked."""
        _changing(request, me, "sign off")
        review = sign_off(app.state.db, name_of(sample_id), me.username)
        _post_to_lis(review)
        return _review_dict(review)

    @app.post("/api/samples/{sample_id}/amend", tags=["review"])
    def api_amend(sample_id: int, body: Amendment, request: Request, me: Me) -> dict:
        """Open a new version of a signed-off sample; the signed version stays as signed."""
        _changing(request, me, "amend")
        return _review_dict(amend(app.state.db, name_of(sample_id), me.username, body.reason))

    @app.get("/api/samples/{sample_id}/audit", tags=["review"])
    def api_audit(sample_id: int, me: Me) -> list[dict]:
        """Every change to the sample's review: who, when, what."""
        entries = audit_trail(app.state.db, name_of(sample_id))
        return [{**e.__dict__, "at": e.at.isoformat()} for e in entries]

    def _changing(request: Request, me: User, action: str) -> None:
        check_csrf(request, request.headers.get(CSRF_HEADER))
        require(me, action)

    def _post_to_lis(review: SampleReview) -> None:
        """Send the signed result to the configured LIS endpoint; a failure is kept in the audit, never
        undoes the signature (the message can be downloaded and sent again)."""
        url = app.state.settings.lis_url
        if not url:
            return
        import httpx

        try:
            httpx.post(
                url,
                content=hl7_message(review).encode(),
                headers={"Content-Type": "application/hl7-v2"},
                timeout=10,
            ).raise_for_status()
        except httpx.HTTPError as exc:
            note_in_audit(
                app.state.db, review.state.sample, "system", "lis", f"LIS post failed: {type(exc).__name__}"
            )

    return app


def _local(target: str) -> str:
    """A redirect target on this site only (no //host, no scheme): an open redirect is refused."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _date(text: str) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"since: {text!r} is not a date (YYYY-MM-DD)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _cell_key(key: str) -> tuple[int, int]:
    try:
        result_id, cell_id = key.split("-")
        return int(result_id), int(cell_id)
    except ValueError:
        raise ValueError(f'cell {key[:40]!r}: expected "<result id>-<cell id>"') from None


def _download(data: bytes, media_type: str, filename: str) -> Response:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in filename)
    return Response(
        data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{safe}"'}
    )


def class_groups(review: SampleReview, shown: int = GROUP_SHOWN) -> list[tuple[str, list, int]]:
    """(class, its first `shown` cells, how many it has), the classes in REVIEW_CLASSES order; within
    one, the analyser's doubts first, then the cells that have a crop."""
    groups = []
    for name in REVIEW_CLASSES:
        cells = [c for c in review.cells if c.current == name]
        cells.sort(key=lambda c: (not c.flagged_for_review, c.result_id, c.cell_id))
        groups.append((name, cells[:shown], len(cells)))
    return groups


def _entry_dict(e) -> dict:
    d = dict(e.__dict__)
    d["created_at"], d["updated_at"] = e.created_at.isoformat(), e.updated_at.isoformat()
    return d


def _review_dict(review: SampleReview) -> dict:
    s = review.state
    return {
        "sample_id": s.sample_id,
        "sample": s.sample,
        "state": s.state,
        "version": s.version,
        "reviewed_by": s.reviewed_by,
        "signed_by": s.signed_by,
        "signed_at": s.signed_at.isoformat() if s.signed_at else None,
        "pending_images": review.pending,
        "before": stats_dict(review.before()),
        "after": stats_dict(review.after()),
        "cells_reclassified": review.changed(),
        "cells": [
            {
                "key": c.key,
                "image": c.image,
                "analyser": c.analyser,
                "current": c.current,
                "flagged_for_review": c.flagged_for_review,
                "labelled_by": c.labelled_by,
            }
            for c in review.cells
        ],
    }
