"""What each encoder can hold. Checked before encoding so that an image a target cannot
hold falls through with one short reason instead of a codec exception."""

from __future__ import annotations

from collections.abc import Callable

from node.transcode.pixels import PixelInfo
from node.transcode.targets import Target

Check = Callable[[PixelInfo, Target], str | None]


def first_problem(info: PixelInfo, target: Target, checks: tuple[Check, ...]) -> str | None:
    for check in checks:
        problem = check(info, target)
        if problem:
            return problem
    return None


def integer_samples(info: PixelInfo, _: Target) -> str | None:
    return "float pixel data unsupported" if info.is_float else None


def not_one_bit(info: PixelInfo, _: Target) -> str | None:
    return "1-bit images unsupported" if info.bits_allocated == 1 else None


def grey_or_three_samples(info: PixelInfo, _: Target) -> str | None:
    if info.samples_per_pixel in (1, 3):
        return None
    return f"{info.samples_per_pixel} samples per pixel unsupported"


def up_to_16_bits(info: PixelInfo, _: Target) -> str | None:
    if info.bits_allocated > 16 or info.bits_stored > 16:
        return f"{info.bits_stored}-bit samples unsupported (max 16)"
    if info.bits_stored < 2:
        return f"{info.bits_stored}-bit samples unsupported (min 2)"
    return None


def rle_segment_limit(info: PixelInfo, _: Target) -> str | None:
    # PS3.5 G.2: at most 15 segments, one per byte of each sample.
    if info.bits_allocated not in (8, 16, 32):
        return f"{info.bits_allocated} bits allocated unsupported"
    segments = info.samples_per_pixel * info.bits_allocated // 8
    return None if segments <= 15 else f"{segments} RLE segments needed (max 15)"


def unsigned_only(info: PixelInfo, _: Target) -> str | None:
    # Near-lossless error would wrap around the sign boundary of the stored bit pattern.
    return "signed pixel data unsupported" if info.is_signed else None


def eight_bit_grey_or_rgb(info: PixelInfo, _: Target) -> str | None:
    if info.bits_allocated != 8 or info.bits_stored != 8:
        return f"{info.bits_stored}-bit samples unsupported (8-bit only)"
    if info.photometric_interpretation not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
        return f"{info.photometric_interpretation} unsupported"
    return None


def not_palette_for_lossy(info: PixelInfo, _: Target) -> str | None:
    # Lossy coding of palette indices changes colours arbitrarily.
    if info.photometric_interpretation == "PALETTE COLOR":
        return "PALETTE COLOR cannot be compressed lossily"
    return None


def not_ybr_for_lossless_jpeg(info: PixelInfo, _: Target) -> str | None:
    # libjpeg-turbo labels three components 'R','G','B' in the frame header; with a YBR
    # Photometric Interpretation decoders such as dcmdjpeg then disagree on colour.
    if info.samples_per_pixel == 3 and info.photometric_interpretation.startswith("YBR"):
        return f"{info.photometric_interpretation} unsupported (the stream would be labelled RGB)"
    return None


NATIVE_CHECKS: tuple[Check, ...] = ()
RLE_CHECKS: tuple[Check, ...] = (integer_samples, not_one_bit, rle_segment_limit)
JPEG_FAMILY_CHECKS: tuple[Check, ...] = (
    integer_samples,
    not_one_bit,
    grey_or_three_samples,
    up_to_16_bits,
)
NEAR_LOSSLESS_CHECKS = (*JPEG_FAMILY_CHECKS, unsigned_only, not_palette_for_lossy)
J2K_LOSSY_CHECKS = (*JPEG_FAMILY_CHECKS, not_palette_for_lossy)
BASELINE_CHECKS = (*JPEG_FAMILY_CHECKS, unsigned_only, eight_bit_grey_or_rgb)
LOSSLESS_JPEG_CHECKS = (*JPEG_FAMILY_CHECKS, not_ybr_for_lossless_jpeg)
