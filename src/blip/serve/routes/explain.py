"""`POST /v1/explain`: ITM Grad-CAM of one image and one text (`blip.tasks.explain`, the same function as
`m.explain` and `blip explain`): per word and for the whole text, the image with a heat overlay as a base64 PNG and
the map's numbers over the patch grid, with P(match) and the layer used."""

from __future__ import annotations

import anyio
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from blip.api import Blip
from blip.serve.errors import ERRORS
from blip.serve.inputs import from_ref
from blip.serve.routes.shared import AUTH, ServiceDep, api_router, finite
from blip.serve.schemas import EXAMPLE_PNG, ImageRef, ModelName, Text, _examples, _Strict
from blip.serve.service import Service
from blip.tasks.batch import ExplainWork, ImageItem
from blip.tasks.explain import BLIP2_REFUSAL, Explanation, check_request, overlay, png_base64
from blip.tasks.options import is_blip2

router = api_router("explain", dependencies=AUTH)


class ExplainRequest(_Strict):
    model_config = ConfigDict(json_schema_extra=_examples({"image": {"b64": EXAMPLE_PNG}, "text": "a red square"}))
    image: ImageRef
    text: Text
    layer: int | None = Field(
        None, ge=0, description="cross-attention layer, 0-based (default: the middle one; not the last)"
    )
    model: ModelName = None


class ExplainMap(BaseModel):
    label: str = Field(description="the word as written, or the whole text")
    png: str = Field(description="base64 PNG: the image (longest side 384) with the map as a translucent heat overlay")
    map: list[list[float]] = Field(description="the Grad-CAM values over the patch grid [g][g] (not normalised)")


class ExplainResponse(BaseModel):
    model: str
    score: float | None = Field(description="ITM P(match) of the pair")
    layer: int
    grid: int = Field(description="side of the patch grid g")
    text: ExplainMap = Field(description="the whole text: the sum of the word maps")
    words: list[ExplainMap] = Field(description="one per whitespace-separated word, in order")


def _explainer(svc: Service, name: str | None) -> tuple[str, Blip]:
    """The model to explain with: the named one, else the first BLIP model with an ITM head (not BLIP-2's)."""
    if name is not None:
        name, blip = svc.resolve(name, "match")
        if is_blip2(blip):
            raise svc.invalid("model", f"model {name!r} is BLIP-2: {BLIP2_REFUSAL}")
        return name, blip
    svc.check_ready()
    for model_name, blip in svc.models.items():
        if "itm" in blip.tasks and not is_blip2(blip):
            return model_name, blip
    raise svc.invalid("model", "no loaded model can explain image-text matching (a BLIP retrieval/ITM checkpoint)")


def _render(image: Image.Image, result: Explanation) -> tuple[ExplainMap, list[ExplainMap]]:
    def one(label: str, heat) -> ExplainMap:
        return ExplainMap(label=label, png=png_base64(overlay(image, heat)), map=heat.astype(float).tolist())

    return one(result.text, result.text_map), [one(w, m) for w, m in zip(result.words, result.word_maps)]


@router.post("/v1/explain", response_model=ExplainResponse, responses=ERRORS)
async def explain(body: ExplainRequest, svc: ServiceDep) -> ExplainResponse:
    """Grad-CAM of image-text matching: where the ITM head's match logit leans, per word and for the whole text."""
    name, blip = _explainer(svc, body.model)
    svc.check_texts([("text", body.text)])
    try:
        check_request(blip, body.text, body.layer)
    except ValueError as e:
        raise svc.invalid("layer" if "layer" in str(e) else "text", str(e)) from e
    source = from_ref(body.image, "image")
    (item,) = await svc.images.load([source])  # as sent: the overlays keep the image's own aspect
    work = ExplainWork(ImageItem(item.key, item.image), body.text)
    result: Explanation = await svc.run("explain", name, body.layer, [], lambda _: work)
    text_map, word_maps = await anyio.to_thread.run_sync(_render, item.image, result)
    return ExplainResponse(
        model=name, score=finite(result.score), layer=result.layer, grid=result.grid, text=text_map, words=word_maps
    )
