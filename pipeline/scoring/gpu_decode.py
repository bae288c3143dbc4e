"""A micro-batch's JPEGs decoded on the scoring actor's device (`image_decoder: nvjpeg`, off by default): one
batched `torchvision.io.decode_jpeg` call (nvJPEG on a GPU; torchvision's libjpeg-turbo decoder on CPUs, so the
path runs and is tested anywhere a torchvision built for the installed torch loads), then padded to a square with
grey and resized to the model's size there (bicubic, antialiased, as Pillow's), so the host does little more than
read JPEG headers.

What the device decodes is only what it decodes the way the Pillow path would: a JPEG (by its magic bytes) that
ends with its end-of-image marker (a truncated one is Pillow's to refuse), in RGB or grey (CMYK is converted
differently), whose EXIF orientation the model would not apply anyway. The decompression-bomb guards hold before
anything is decoded: the header's dimensions against `max_image_pixels`, and the JPEG's scans against the limit
its size allows (a scan bomb), refused in the Pillow path's words.
Everything else (PNG, WebP, GIF, the JPEGs above, prepared pixels) takes the Pillow path on the decode threads,
and so does a JPEG the device decoder rejects (a failed batch is retried one image at a time to find it): a
corrupt JPEG is that sample's error record as the Pillow path words it, never the micro-batch's. A CUDA error is
the device's (`narrowing.is_device_error`): it is raised, for the scorer to end the actor; out of memory is
raised as such, for the scorer to split the micro-batch.

Streams, on a GPU: torchvision allocates the decoded images on the caller's current stream, nvJPEG writes them on
a stream of its own, and the caller's stream then waits for it. Were the outputs allocated on the micro-batch's
copy stream, memory freed there (the previous micro-batch's decoded images, still being read by its resize
kernels) could be handed straight to the next decode, which nvJPEG overwrites out of that stream's order:
wrong pixels, depending on timing. So the decode runs with a stream of its own current (`_decode_stream`): the
consumer waits for it, and each output is recorded as used by the consumer, so its memory returns to the decode
stream's pool only once the consumer's reads of it are done."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, Future

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.errors import SampleError, SampleFailure
from model.processing import (
    PAD_COLOR,
    EncodedSample,
    PlannedSample,
    refuse_too_large_square,
    refuse_too_many_pixels,
    refuse_too_many_scans,
)
from pipeline.errors import InputError
from pipeline.scoring.narrowing import is_device_error

JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112
_DEVICE_MODES = ("RGB", "L")  # what decode_jpeg's RGB mode converts as Pillow does

# decode_jpegs(list of 1-D uint8 CPU tensors, device) -> list of (3, H, W) uint8 tensors on `device`
DecodeJpegs = Callable[[list, torch.device], list]


def torchvision_problem() -> str | None:
    """Why torchvision's JPEG decoder cannot be used in this process, or None. A torchvision built for another
    torch (PyPI's CUDA wheel beside a CPU torch, say) imports no further than its compiled ops."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401

        torch.ops.image.decode_jpeg  # noqa: B018 - the compiled image ops, not only the Python package
    except Exception as err:  # noqa: BLE001 - ImportError, or RuntimeError from a torchvision for another torch
        return f"torchvision cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


def require_torchvision() -> None:
    """The `image_decoder: nvjpeg` setting's precondition, checked before anything is written (exit status 2)."""
    problem = torchvision_problem()
    if problem:
        raise InputError("image_decoder", f"nvjpeg decodes with torchvision's decode_jpeg, and {problem}: install "
                                          f"the torchvision built for this torch ({torch.__version__}), or keep the "
                                          "default image_decoder pillow")


def torchvision_decode_jpegs(datas: list, device: torch.device) -> list:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


class DeviceImageDecoder:
    """Decodes planned samples' images onto `device`: JPEGs in one `decode_jpegs` call per micro-batch (default
    torchvision's), the rest by `processor.image_pixels` on `pool` (inline when none). On a GPU, call it with the
    stream the micro-batch is copied on current (`BatchScorer.prepare` does)."""

    def __init__(self, processor, device: torch.device, pool: Executor | None = None,
                 decode_jpegs: DecodeJpegs | None = None):
        if decode_jpegs is None:
            require_torchvision()
        self.processor = processor
        self.device = torch.device(device)
        self.pool = pool
        self.decode_jpegs = decode_jpegs or torchvision_decode_jpegs
        self._decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def decode(self, samples: list[PlannedSample]) -> list[EncodedSample | SampleFailure]:
        """Each sample with its images at model size on the device ((n, 3, S, S) uint8), or its failure
        (the first failing image's, as the Pillow path gives it)."""
        images = [image for sample in samples for image in sample.images]
        on_device: list[int] = []  # indices into `images` of the JPEGs the device decodes
        out: list = [None] * len(images)  # per image: pixels (a tensor or an array), a Future of them, or a failure
        for k, image in enumerate(images):
            admitted = self._admit(image)
            if admitted is True:
                on_device.append(k)
            else:
                out[k] = admitted if isinstance(admitted, SampleFailure) else self._on_host(image)
        decoded, rejected = self._decode_jpegs([images[k] for k in on_device])
        for k, pixels in zip(on_device, decoded):
            out[k] = pixels
        for i in rejected:  # the Pillow path decides: its pixels, or its words for what is wrong
            out[on_device[i]] = self._on_host(images[on_device[i]])
        return self._samples(samples, [self._resolved(o) for o in out])

    # -- which decoder ---------------------------------------------------------------------------------------
    def _admit(self, image) -> bool | SampleFailure | None:
        """True: the device decodes it; a failure: refused by the bomb guard; None: the Pillow path's."""
        if not isinstance(image, (bytes, bytearray, memoryview)):
            return None
        data = bytes(image)
        if not data.startswith(JPEG_START) or not data.endswith(JPEG_END):
            return None
        try:
            with warnings.catch_warnings():  # Pillow's own bomb warning: the Pillow path words it
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                header = Image.open(io.BytesIO(data), formats=("JPEG",))  # the header only: no pixel decoded
            width, height = header.size
            refuse_too_many_pixels(width, height, self.processor.max_image_pixels)
            refuse_too_large_square(width, height, max(width, height), self.processor.max_image_pixels)
            refuse_too_many_scans(data, width, height, self.processor.max_image_pixels)
            if header.mode not in _DEVICE_MODES:
                return None
            if self.processor.config.exif_transpose and header.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return None
        except SampleError as err:
            return SampleFailure.of(err)
        except Exception:  # noqa: BLE001 - a header Pillow refuses: the Pillow path, which refuses it before
            return None  # decoding too, words why
        return True

    def _on_host(self, image) -> Future | np.ndarray | SampleFailure:
        if self.pool is None:
            return _host_pixels(self.processor, image)
        return self.pool.submit(_host_pixels, self.processor, image)

    # -- on the device ---------------------------------------------------------------------------------------
    def _decode_jpegs(self, datas: list[bytes]) -> tuple[list, list[int]]:
        """(pixels at model size on the device, one per JPEG or None where rejected; the rejected indices)."""
        if not datas:
            return [], []
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
        try:
            decoded = self._decoded(tensors)
        except Exception as err:  # noqa: BLE001 - one bad JPEG fails the whole call: find it, one at a time
            _raise_if_device(err)
            decoded = [self._decode_one(t) for t in tensors]
        rejected = [i for i, pixels in enumerate(decoded) if pixels is None]
        size = self.processor.config.image_size
        return [None if pixels is None else to_model_size(pixels, size) for pixels in decoded], rejected

    def _decoded(self, tensors: list[torch.Tensor]) -> list:
        """`decode_jpegs` on the decode stream (on a GPU), its outputs safe to read on the caller's stream."""
        if self._decode_stream is None:
            return self.decode_jpegs(tensors, self.device)
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._decode_stream):
            decoded = self.decode_jpegs(tensors, self.device)
        consumer.wait_stream(self._decode_stream)
        for pixels in decoded:
            pixels.record_stream(consumer)
        return decoded

    def _decode_one(self, tensor: torch.Tensor) -> torch.Tensor | None:
        try:
            return self._decoded([tensor])[0]
        except Exception as err:  # noqa: BLE001 - rejected: the Pillow path decides
            _raise_if_device(err)
            return None

    # -- per sample ------------------------------------------------------------------------------------------
    def _resolved(self, pixels) -> torch.Tensor | SampleFailure:
        if isinstance(pixels, Future):
            pixels = pixels.result()
        if isinstance(pixels, np.ndarray):
            host = torch.from_numpy(pixels)
            if self.device.type == "cuda":
                return host.pin_memory().to(self.device, non_blocking=True)
            return host.to(self.device)
        return pixels

    def _samples(self, samples: list[PlannedSample], pixels: list) -> list[EncodedSample | SampleFailure]:
        out: list[EncodedSample | SampleFailure] = []
        start = 0
        size = self.processor.config.image_size
        for sample in samples:
            mine, start = pixels[start:start + sample.n_images], start + sample.n_images
            failure = next((p for p in mine if isinstance(p, SampleFailure)), None)
            if failure is not None:
                out.append(failure)
                continue
            stacked = torch.stack(mine) if mine else torch.zeros((0, 3, size, size), dtype=torch.uint8,
                                                                 device=self.device)
            out.append(EncodedSample(sample.input_ids, stacked, sample.truncated))
        return out


def to_model_size(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8 on its device: padded to a centred square with grey, then resized
    as Pillow resizes (bicubic, a = -0.5, widened when shrinking): width first, rounded to 8 bits, then height.
    Rounding between the passes as Pillow does brings the mean difference from its pixels down from 0.14 grey
    levels (one float pass) to 0.001 on photo-like JPEGs at 384 px; one code path on every device, so the CPU
    tests run the arithmetic a GPU runs."""
    _, height, width = image.shape
    side = max(height, width)
    if height != width:
        square = image.new_empty((3, side, side))
        for c, grey in enumerate(PAD_COLOR):
            square[c].fill_(grey)
        top, left = (side - height) // 2, (side - width) // 2
        square[:, top:top + height, left:left + width] = image
        image = square
    if side == size:
        return image.contiguous()
    pixels = image[None].float()
    for shape in ((side, size), (size, size)):
        pixels = F.interpolate(pixels, size=shape, mode="bicubic", antialias=True, align_corners=False)
        pixels = pixels.round_().clamp_(0, 255)
    return pixels[0].to(torch.uint8)


def _raise_if_device(err: Exception) -> None:
    """A CUDA error is the device's fault, never a sample's; out of memory is raised as such (torchvision wraps
    the allocator's error in a RuntimeError), so the scorer splits the micro-batch."""
    if isinstance(err, torch.OutOfMemoryError) or is_device_error(err):
        raise err
    if "out of memory" in str(err):
        raise torch.OutOfMemoryError(str(err)) from err


def _host_pixels(processor, image) -> np.ndarray | SampleFailure:
    """The Pillow path for one image (on a decode thread): its pixels, or its failure."""
    try:
        return processor.image_pixels(image)
    except Exception as err:  # noqa: BLE001 - never lose a sample to an unforeseen failure: record it
        return SampleFailure.of(err)
