"""Our own API, with scores and the task options of `blip.tasks.options`: `POST /v1/caption|vqa|match|similarity|embed`
(JSON, images by URL or base64) and each `.../upload` (multipart files), `POST /v1/retrieve` (search a collection
index), `POST /v1/reason` (NLVR2 over image pairs, JSON only), `GET /v1/models` and `GET /v1/indexes`. A JSON route
and its upload differ only in how the images and the fields arrive: both go through one function per task here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Form
from pydantic import BaseModel

from blip.serve.errors import ERRORS
from blip.serve.indexes import ServedIndex
from blip.serve.inputs import ImageSource, from_ref, from_refs
from blip.serve.routes.shared import AUTH, ServiceDep, Uploads, answer_groups, api_router, finite, read_uploads
from blip.serve.schemas import (
    AnswerOut,
    CaptionForm,
    CaptionOut,
    CaptionRequest,
    CaptionResponse,
    CaptionResult,
    EmbedRequest,
    EmbedResponse,
    IndexesResponse,
    IndexOut,
    MatchResponse,
    ModelForm,
    ModelInfo,
    ModelsResponse,
    OpenAiModel,
    PairRequest,
    ReasonRequest,
    ReasonResponse,
    RetrieveHit,
    RetrieveRequest,
    RetrieveResponse,
    SimilarityResponse,
    TextsForm,
    VerdictOut,
    VqaForm,
    VqaRequest,
    VqaResponse,
    VqaResult,
    to_options,
)
from blip.serve.service import Service
from blip.tasks.options import CaptionOptions, VqaOptions, is_blip2
from blip.tasks.retrieval import RetrieveOptions

if TYPE_CHECKING:
    from blip.api import Blip

router = api_router("blip", dependencies=AUTH)


# --- what the server holds -------------------------------------------------------------------------------------------


@router.get("/v1/models", response_model=ModelsResponse, responses={401: ERRORS[401]})
async def list_models(svc: ServiceDep) -> ModelsResponse:
    """The loaded models: family (BLIP or BLIP-2), kind, tasks and, for BLIP-2 OPT and T5, the VQA prompt template;
    `data` lists them as the OpenAI API does (`client.models.list()`)."""
    loaded = list(svc.models.items() if svc.loaded else [])
    return ModelsResponse(
        models=[_model_info(n, m) for n, m in loaded],
        data=[OpenAiModel(id=n, created=svc.started_at) for n, _ in loaded],
    )


def _model_info(name: str, blip: Blip) -> ModelInfo:
    family = "blip2" if is_blip2(blip) else "blip"
    template = getattr(blip, "prompt_template", None) if "vqa" in blip.tasks and family == "blip2" else None
    return ModelInfo(
        name=name,
        family=family,
        kind=str(blip.config.kind),
        tasks=sorted(blip.tasks),
        source=blip.source,
        prompt_template=template,
    )


@router.get("/v1/indexes", response_model=IndexesResponse, responses={401: ERRORS[401]})
async def list_indexes(svc: ServiceDep) -> IndexesResponse:
    """The collection indexes /v1/retrieve searches, with the model that embedded each."""
    infos = [
        IndexOut(
            name=name,
            model=served.model,
            count=served.count,
            dim=served.collection.index.info.dim,
            kind=served.collection.index.info.kind,
            backend=served.collection.index.info.backend,
        )
        for name, served in (svc.indexes.items() if svc.loaded else [])
    ]
    return IndexesResponse(indexes=infos)


# --- captions ---------------------------------------------------------------------------------------------------------


async def _caption(svc: Service, params: BaseModel, model: str | None, sources: list[ImageSource]) -> CaptionResponse:
    name, blip = svc.resolve(model, "caption")
    options = svc.options(lambda: to_options(params, CaptionOptions))
    captions = await svc.caption(name, blip, options, sources)
    results = [
        CaptionResult(
            captions=[CaptionOut(text=c.text, score=finite(c.score), token_ids=list(c.token_ids)) for c in per]
        )
        for per in captions
    ]
    return CaptionResponse(model=name, results=results)


@router.post("/v1/caption", response_model=CaptionResponse, responses=ERRORS)
async def caption(body: CaptionRequest, svc: ServiceDep) -> CaptionResponse:
    """Captions with scores and token ids; `num_captions` per image."""
    return await _caption(svc, body, body.model, from_refs(body.images))


@router.post("/v1/caption/upload", response_model=CaptionResponse, responses=ERRORS)
async def caption_upload(form: Annotated[CaptionForm, Form()], images: Uploads, svc: ServiceDep) -> CaptionResponse:
    """/v1/caption with images uploaded as multipart files."""
    return await _caption(svc, form, form.model, await read_uploads(svc, images))


# --- questions --------------------------------------------------------------------------------------------------------


async def _vqa(
    svc: Service, params: BaseModel, model: str | None, sources: list[ImageSource], groups: list[list[str]]
) -> VqaResponse:
    name, per_image = await answer_groups(svc, model, sources, groups, lambda: to_options(params, VqaOptions))
    results = [
        VqaResult(
            answers=[
                AnswerOut(question=q, text=a.text, score=finite(a.score), token_ids=a.token_ids) for q, a in answers
            ]
        )
        for answers in per_image
    ]
    return VqaResponse(model=name, results=results)


@router.post("/v1/vqa", response_model=VqaResponse, responses=ERRORS)
async def vqa(body: VqaRequest, svc: ServiceDep) -> VqaResponse:
    """Answers with scores: `questions[i]` are the questions about `images[i]`; each image is encoded once."""
    if len(body.questions) != len(body.images):
        raise svc.invalid("questions", f"{len(body.questions)} question lists for {len(body.images)} images")
    return await _vqa(svc, body, body.model, from_refs(body.images), body.questions)


@router.post("/v1/vqa/upload", response_model=VqaResponse, responses=ERRORS)
async def vqa_upload(form: Annotated[VqaForm, Form()], images: Uploads, svc: ServiceDep) -> VqaResponse:
    """/v1/vqa with multipart files; every `questions` field is asked about every uploaded image."""
    sources = await read_uploads(svc, images)
    return await _vqa(svc, form, form.model, sources, [list(form.questions) for _ in sources])


# --- image-text scores ------------------------------------------------------------------------------------------------


def _pairing(n_images: int, n_texts: int) -> list[int]:
    """image index per text for match: one image with each text, each image with one text, or pairwise."""
    if n_images == 1:
        return [0] * n_texts
    if n_texts == 1 or n_images == n_texts:
        return list(range(n_images))
    raise Service.invalid(
        "texts", f"{n_images} images but {n_texts} texts: give one image, one text, or lists of the same length"
    )


async def _match(svc: Service, model: str | None, sources: list[ImageSource], texts: list[str]) -> MatchResponse:
    name, _ = svc.resolve(model, "match")
    svc.check_images_and_texts(len(sources), texts)
    image_of = _pairing(len(sources), len(texts))
    texts = texts * len(sources) if len(texts) == 1 and len(sources) > 1 else texts
    return MatchResponse(model=name, scores=await svc.match(name, sources, texts, image_of))


@router.post("/v1/match", response_model=MatchResponse, responses=ERRORS)
async def match(body: PairRequest, svc: ServiceDep) -> MatchResponse:
    """ITM probability that image and text match: one image with each text, or pairwise."""
    return await _match(svc, body.model, from_refs(body.images), list(body.texts))


@router.post("/v1/match/upload", response_model=MatchResponse, responses=ERRORS)
async def match_upload(form: Annotated[TextsForm, Form()], images: Uploads, svc: ServiceDep) -> MatchResponse:
    return await _match(svc, form.model, await read_uploads(svc, images), list(form.texts))


async def _similarity(
    svc: Service, model: str | None, sources: list[ImageSource], texts: list[str]
) -> SimilarityResponse:
    name, _ = svc.resolve(model, "similarity")
    svc.check_images_and_texts(len(sources), texts)
    return SimilarityResponse(model=name, scores=await svc.similarity(name, sources, texts))


@router.post("/v1/similarity", response_model=SimilarityResponse, responses=ERRORS)
async def similarity(body: PairRequest, svc: ServiceDep) -> SimilarityResponse:
    """ITC cosine similarity of every image with every text."""
    return await _similarity(svc, body.model, from_refs(body.images), list(body.texts))


@router.post("/v1/similarity/upload", response_model=SimilarityResponse, responses=ERRORS)
async def similarity_upload(form: Annotated[TextsForm, Form()], images: Uploads, svc: ServiceDep) -> SimilarityResponse:
    return await _similarity(svc, form.model, await read_uploads(svc, images), list(form.texts))


async def _embed(svc: Service, model: str | None, sources: list[ImageSource]) -> EmbedResponse:
    name, _ = svc.resolve(model, "embed")
    features = await svc.embed(name, sources)
    return EmbedResponse(model=name, shape=list(features.shape), embeddings=features.tolist())


@router.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS)
async def embed(body: EmbedRequest, svc: ServiceDep) -> EmbedResponse:
    """ITC image features (what `Blip.embed_images` returns): `[dim]` per image for BLIP, `[queries][dim]` for
    BLIP-2."""
    return await _embed(svc, body.model, from_refs(body.images))


@router.post("/v1/embed/upload", response_model=EmbedResponse, responses=ERRORS)
async def embed_upload(form: Annotated[ModelForm, Form()], images: Uploads, svc: ServiceDep) -> EmbedResponse:
    return await _embed(svc, form.model, await read_uploads(svc, images))


# --- visual reasoning (NLVR2) -----------------------------------------------------------------------------------------


@router.post("/v1/reason", response_model=ReasonResponse, responses=ERRORS)
async def reason(body: ReasonRequest, svc: ServiceDep) -> ReasonResponse:
    """NLVR2: P(true) of each statement about its image pair (image_a[i], image_b[i]); a list of one item goes with
    every pair; each distinct image is encoded once."""
    name, _ = svc.resolve(body.model, "reason")
    lengths = {"image_a": len(body.image_a), "image_b": len(body.image_b), "statements": len(body.statements)}
    n = max(lengths.values())
    for field, length in lengths.items():
        if length not in (1, n):
            given = ", ".join(f"{k}: {v}" for k, v in lengths.items())
            raise svc.invalid(field, f"lists pair up: give {n} items or one ({given})")
    sources = from_refs(body.image_a, "image_a") + from_refs(body.image_b, "image_b")
    first_b = len(body.image_a)
    image_a = [i if len(body.image_a) > 1 else 0 for i in range(n)]
    image_b = [first_b + (i if len(body.image_b) > 1 else 0) for i in range(n)]
    statements = list(body.statements) * n if len(body.statements) == 1 else list(body.statements)
    verdicts = await svc.reason(name, sources, statements, image_a, image_b)
    return ReasonResponse(model=name, results=[VerdictOut(label=v.label, score=finite(v.score)) for v in verdicts])


# --- collection search ------------------------------------------------------------------------------------------------


def _rerank(svc: Service, served: ServedIndex, body: RetrieveRequest) -> bool:
    """Whether to re-rank by ITM, after checking the query: exactly one of text and image, within the limits."""
    blip = svc.models[served.model]
    if body.text is None and body.image is None:
        raise svc.invalid("text", "give a query: 'text' (images matching it) or 'image' (images similar to it)")
    if body.text is not None and body.image is not None:
        raise svc.invalid("image", "give one query: 'text' or 'image', not both")
    svc.check_top_k(body.top_k)
    if body.image is not None:
        if body.rerank:
            raise svc.invalid("rerank", "image queries are ranked by ITC similarity only (ITM scores image-text pairs)")
        return False
    svc.check_texts([("text", body.text or "")])
    rerank = "itm" in blip.tasks if body.rerank is None else body.rerank
    if rerank and "itm" not in blip.tasks:
        message = f"model {served.model!r} of index {served.name!r} has no ITM head to re-rank with ({blip!r})"
        raise svc.invalid("rerank", f"{message}; send rerank: false")
    return rerank


@router.post("/v1/retrieve", response_model=RetrieveResponse, responses=ERRORS)
async def retrieve(body: RetrieveRequest, svc: ServiceDep) -> RetrieveResponse:
    """Search a collection index (`blip serve --index`) with a text or an image: the ITC top_k, text queries
    re-ranked by ITM (both scores returned), as `blip retrieve` does."""
    served = svc.resolve_index(body.index)
    rerank = _rerank(svc, served, body)
    query = "image" if body.image is not None else "text"
    options = RetrieveOptions(served.name, query, body.top_k, rerank)
    image = from_ref(body.image, "image") if body.image is not None else None
    hits = await svc.retrieve(served, options, body.text, image)
    results = [
        RetrieveHit(rank=h.rank, image=h.image, itc_score=h.itc, itm_score=h.itm if rerank else None) for h in hits
    ]
    return RetrieveResponse(index=served.name, model=served.model, query=query, reranked=rerank, results=results)
