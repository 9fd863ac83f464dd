"""`POST /` and `POST /predict`, the model card's schema: `{"secret_token", "inputs": {"texts", "images"}}` ->
`{"captions": [{"image_results": [...]}]}`: `texts[i]` are the questions about `images[i]`; without texts, captions.
The token may come in the body as `secret_token` instead of the Authorization header."""

from __future__ import annotations

from blip.serve.errors import ERRORS
from blip.serve.inputs import from_refs
from blip.serve.routes.shared import Credentials, ModelQuery, ServiceDep, answer_groups, api_router
from blip.serve.schemas import CardImageResult, CardRequest, CardResponse
from blip.tasks.options import CaptionOptions, VqaOptions

PATHS = ("/", "/predict")  # the middleware lets these carry the token in the body

router = api_router("model card")


async def predict(
    body: CardRequest, credentials: Credentials, svc: ServiceDep, model: ModelQuery = None
) -> CardResponse:
    svc.authorize(credentials, body.secret_token)
    inputs = body.inputs
    sources = from_refs(inputs.images, "inputs.images")
    if inputs.texts is None:
        name, blip = svc.resolve(model, "caption", field="inputs.texts")
        captions = await svc.caption(name, blip, CaptionOptions(), sources, field="inputs.images")
        return CardResponse(captions=[CardImageResult(image_results=[c[0].text]) for c in captions])
    if len(inputs.texts) != len(inputs.images):
        message = f"{len(inputs.texts)} question lists for {len(inputs.images)} images (texts[i]: images[i])"
        raise svc.invalid("inputs.texts", message)
    # the schema has no model field: no model to answer with is an error of the texts, as no captioner is above
    fields = ("inputs.texts", "inputs.images", "inputs.texts")
    _, per_image = await answer_groups(svc, model, sources, inputs.texts, VqaOptions, fields)
    return CardResponse(captions=[CardImageResult(image_results=[a.text for _, a in pairs]) for pairs in per_image])


for path in PATHS:
    router.add_api_route(
        path,
        predict,
        methods=["POST"],
        response_model=CardResponse,
        responses=ERRORS,
        summary="model-card schema: texts[i] are the questions about images[i]; no texts: captions",
        operation_id=f"predict{path.replace('/', '_')}",
    )
