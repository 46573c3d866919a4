"""The dev checkpoint's tokenizer: a byte-fallback BPE in Gemma's style, trained on clinical text.

Guarantees: deterministic (the same corpus gives the same vocabulary); Gemma 3's special
tokens at fixed ids; ``visible_token_ids`` lists the tokens that decode on their own to
visible ASCII text (the only ones the dev model's output layer lets it sample).
"""

from __future__ import annotations

import json

SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
NEWLINE_TOKENS = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]


# Training text for the tokenizer's BPE merges: clinical vocabulary, so that prompts in
# tests and load tests tokenize to plausible lengths.
_CORPUS = """
The patient is a 54 year old woman with chest pain, shortness of breath and a dry cough.
Findings: the chest radiograph shows no pneumothorax, no pleural effusion and a normal
cardiac silhouette. Impression: no acute cardiopulmonary abnormality. Describe this image.
What is the most likely diagnosis? Consider pneumonia, atelectasis, edema, consolidation,
cardiomegaly, fracture, nodule, mass, opacity, infiltrate, emphysema, fibrosis.
The lesion is asymmetric with irregular borders and several colours; dermoscopy shows an
atypical pigment network. Differential diagnosis: melanoma, nevus, seborrheic keratosis,
basal cell carcinoma. Recommend biopsy and follow up in three months.
History of hypertension, diabetes mellitus type 2, hyperlipidemia and chronic kidney disease.
Medications: metformin, lisinopril, atorvastatin, aspirin. Allergies: penicillin.
Vital signs: blood pressure, heart rate, respiratory rate, temperature, oxygen saturation.
Laboratory results: hemoglobin, white blood cell count, platelets, sodium, potassium,
creatinine, glucose, troponin. The computed tomography scan of the abdomen and pelvis
demonstrates a small hypodense lesion in the liver, likely a cyst. Magnetic resonance
imaging of the brain is unremarkable. Ultrasound of the right upper quadrant shows
gallstones without signs of cholecystitis. Histopathology slide with hematoxylin and eosin
stain shows glandular structures. Fundus photograph of the retina with microaneurysms and
hemorrhages suggests diabetic retinopathy. Please summarise the report for the patient in
plain language. Answer briefly and explain your reasoning step by step.
You are a helpful medical assistant. You are an expert radiologist.
left right upper lower anterior posterior lateral medial bilateral normal abnormal mild
moderate severe acute chronic stable improved worse increased decreased present absent
"""


def train_tokenizer():
    """A byte-fallback BPE tokenizer in Gemma's style (SentencePiece ``▁`` spaces)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    alphabet = [chr(c) for c in range(33, 127)] + ["▁"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS + byte_tokens,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    # Train on text already in the ▁ form; words never merge across spaces.
    words = _CORPUS.split()
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.train_from_iterator(["▁" + w for w in words] * 2, trainer=trainer)

    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    for text in NEWLINE_TOKENS:
        vocab.setdefault(text, len(vocab))
    # Byte tokens are ordinary vocabulary entries in Gemma's tokenizer, not added tokens.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    for added in data["added_tokens"]:
        added["normalized"] = False
    data["pre_tokenizer"] = None
    data["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    data["decoder"] = json.loads(
        decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        ).__getstate__()
    )
    tok = Tokenizer.from_str(json.dumps(data))
    # Newline runs are literal added tokens in the real vocabulary too (vLLM's gemma3
    # processor looks up "\n".."\n\n\n\n" by value).
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in reversed(NEWLINE_TOKENS)])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return tok


def visible_token_ids(vocab: dict[str, int]) -> list[int]:
    """Ids of tokens that decode on their own to at least one visible ASCII character."""
    visible = []
    for piece, idx in vocab.items():
        text = piece.replace("▁", " ")
        if piece in SPECIAL_TOKENS or piece.startswith("<0x") or not text.strip():
            continue
        if text.isascii() and text.isprintable():
            visible.append(idx)
    return sorted(visible)
