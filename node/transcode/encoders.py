"""Frame encoders: one numpy frame in, one compressed frame (a DICOM fragment) out.

Fast, GIL-releasing codecs are preferred (2 threads run them 2x faster, the others 1x):
imagecodecs CharLS for JPEG-LS,
OpenJPEG for J2K lossless, OpenJPH for HTJ2K, libjpeg-turbo for JPEG, pylibjpeg-rle for RLE.
"""

from __future__ import annotations

import math

import imagecodecs
import jpeg_ls
import numpy as np
from rle.utils import encode_pixel_data

from node.transcode.pixels import PixelInfo, as_stored_unsigned
from node.transcode.targets import Target


def _is_rgb(info: PixelInfo) -> bool:
    return info.samples_per_pixel == 3 and info.photometric_interpretation == "RGB"


def _resolutions(info: PixelInfo) -> int:
    # OpenJPEG/OpenJPH refuse more decomposition levels than the image can halve into
    # (a 3x3 image fails with the default); 6 resolutions is the usual default.
    smallest = max(1, min(info.rows, info.columns))
    return max(1, min(6, int(math.log2(smallest)) + 1))


def encode_rle(frame: np.ndarray, info: PixelInfo, _: Target) -> bytes:
    data = frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes()
    return encode_pixel_data(
        data,
        rows=info.rows,
        columns=info.columns,
        samples_per_pixel=info.samples_per_pixel,
        bits_allocated=info.bits_allocated,
        byteorder="<",
    )


def encode_jpegls(frame: np.ndarray, info: PixelInfo, target: Target) -> bytes:
    near = target.near_lossless or 0
    stored = as_stored_unsigned(frame, info)
    if info.bits_stored == 8 * frame.dtype.itemsize:
        # imagecodecs' CharLS is the fastest, but it always writes the container's
        # precision; that is only right when Bits Stored fills the container.
        return bytes(imagecodecs.jpegls_encode(stored, level=near))
    # The decoder sign-extends from the stream's precision (P), so P must equal
    # Bits Stored: pyjpegls lets us say so.
    return bytes(
        jpeg_ls.encode_buffer(
            np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes(),
            rows=info.rows,
            columns=info.columns,
            samples_per_pixel=info.samples_per_pixel,
            bits_stored=info.bits_stored,
            lossy_error=near,
            interleave_mode=2 if info.samples_per_pixel > 1 else 0,
        )
    )


def encode_j2k_lossless(frame: np.ndarray, info: PixelInfo, _: Target) -> bytes:
    return bytes(
        imagecodecs.jpeg2k_encode(
            frame,
            codecformat="J2K",
            reversible=True,
            bitspersample=info.bits_stored,
            mct=_is_rgb(info),
            resolutions=_resolutions(info),
            numthreads=1,
        )
    )


def encode_j2k_lossy(frame: np.ndarray, info: PixelInfo, target: Target) -> bytes:
    # pylibjpeg-openjpeg has rate control by ratio and by PSNR; it is not thread-safe
    # (two threads encoding at once crash it), which is fine in a single-threaded worker
    # process.
    from openjpeg import encode as encode_array

    ratios = [target.j2k_ratio] if target.j2k_ratio else None
    psnrs = [target.j2k_psnr] if target.j2k_psnr else None
    return encode_array(
        np.ascontiguousarray(frame),
        bits_stored=info.bits_stored,
        photometric_interpretation=1 if _is_rgb(info) else 0,
        use_mct=_is_rgb(info),
        compression_ratios=ratios,
        signal_noise_ratios=psnrs,
    )


def encode_htj2k_lossless(frame: np.ndarray, info: PixelInfo, _: Target) -> bytes:
    return _htj2k(frame, info, reversible=True, rpcl=False)


def encode_htj2k_rpcl(frame: np.ndarray, info: PixelInfo, _: Target) -> bytes:
    return _htj2k(frame, info, reversible=True, rpcl=True)


def encode_htj2k_lossy(frame: np.ndarray, info: PixelInfo, target: Target) -> bytes:
    # OpenJPH has no rate control, only a quantisation step: bisect the step (in log
    # space) until the codestream reaches the requested ratio. HTJ2K is fast enough.
    wanted = target.j2k_ratio or 10.0
    low, high = math.log(1e-5), math.log(0.5)
    best = _htj2k(frame, info, reversible=False, rpcl=False, qstep=math.exp(low))
    for _ in range(12):
        middle = (low + high) / 2
        encoded = _htj2k(frame, info, reversible=False, rpcl=False, qstep=math.exp(middle))
        if frame.nbytes / len(encoded) >= wanted:
            best, high = encoded, middle
        else:
            low = middle
    return best


def _htj2k(
    frame: np.ndarray, info: PixelInfo, *, reversible: bool, rpcl: bool, qstep: float | None = None
) -> bytes:
    # OpenJPH writes RPCL progression by default; the .202 syntax also wants TLM
    # marker segments and tile-parts split by resolution (PS3.5 8.2.14).
    return bytes(
        imagecodecs.htj2k_encode(
            frame,
            level=qstep,
            rgb=_is_rgb(info),
            reversible=reversible,
            resolutions=_resolutions(info),
            tlm=rpcl or None,
            tilepart=imagecodecs.HTJ2K.TILEPART.RESOLUTIONS if rpcl else None,
        )
    )


def encode_jpeg_sv1(frame: np.ndarray, info: PixelInfo, _: Target) -> bytes:
    # libjpeg-turbo's lossless mode with predictor 1 and no point transform is exactly
    # Process 14 SV1; imagecodecs' ljpeg (liblj92) uses predictor 6, which is not.
    encoded = imagecodecs.jpeg8_encode(
        as_stored_unsigned(frame, info),
        lossless=True,
        predictor=1,
        bitspersample=info.bits_stored,
    )
    return strip_jfif(bytes(encoded))


def encode_jpeg_baseline(frame: np.ndarray, info: PixelInfo, target: Target) -> bytes:
    if info.samples_per_pixel == 1:
        return bytes(imagecodecs.jpeg8_encode(frame, level=target.jpeg_quality))
    # 4:2:2 (horizontal only) is what YBR_FULL_422 promises.
    return bytes(imagecodecs.jpeg8_encode(frame, level=target.jpeg_quality, subsampling="422"))


def strip_jfif(stream: bytes) -> bytes:
    """Drop a JFIF APP0 segment: it claims YCbCr, which a lossless RGB stream is not."""
    if stream[2:4] == b"\xff\xe0" and stream[6:11] == b"JFIF\0":
        length = int.from_bytes(stream[4:6], "big")
        return stream[:2] + stream[4 + length :]
    return stream


def j2k_colour_transform(codestream: bytes) -> tuple[bool, bool]:
    """(multi-component transform used, reversible wavelet) from the COD marker segment."""
    end = codestream.find(b"\xff\x90")  # SOT: the main header ends here
    at = codestream.find(b"\xff\x52", 0, end if end > 0 else None)
    if at < 0:
        raise ValueError("no COD marker in the J2K main header")
    return codestream[at + 8] == 1, codestream[at + 13] == 1
