"""CLIP's pixel statistics, without TensorFlow: what every image is normalised with before the
image tower (OpenAI's values, which open_clip keeps). The tf.data pipeline (`image_ops`) and
evaluation's on-device normalisation both read them from here."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB, of pixels in [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
