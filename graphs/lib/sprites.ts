/**
 * A deterministic, offline stand-in for the image model of a sprite-sheet pipeline (SpriteForge): it draws
 * a base character, renders one animation row at a time as a PNG strip, sometimes gets a strip wrong the
 * way a real model does, and provides the pixel check that catches it and the final sheet assembly.
 * Everything is a pure function of its arguments, so a resumed run reproduces the exact same bytes.
 */
import { readFile } from "node:fs/promises";
import { extname } from "node:path";
import { PNG } from "pngjs";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { hashText, seededRandom } from "./random.ts";

const HexColour = z.string().regex(/^#(?:[0-9a-f]{3}|[0-9a-f]{6})$/i, "expected a hex colour such as #c0392b or #fff");

/** One row of the sheet: an animation and how many frames it has. */
export const AnimationRow = z.strictObject({
  animation: z.string().min(1),
  frames: z.number().int().min(1).max(16),
});

export type AnimationRow = z.infer<typeof AnimationRow>;

/**
 * A character to draw: its name, the size of one square frame in pixels, the animation rows top to bottom,
 * and optionally its colours and the seed of its base drawing. Unknown keys are rejected so a typo such as
 * `frame_size` fails loudly instead of silently using the default.
 */
export const CharacterConfig = z.strictObject({
  name: z.string().min(1),
  frameSize: z.number().int().min(8).max(256).default(32),
  rows: z.array(AnimationRow).min(1),
  palette: z.array(HexColour).min(1).optional(),
  seed: z.number().int().optional(),
});
export type CharacterConfig = z.infer<typeof CharacterConfig>;

/** A decoded image: 8-bit RGBA, row-major, `width * height * 4` bytes. */
export interface RgbaImage {
  width: number;
  height: number;
  data: Uint8Array;
}

/** Whether a strip passed {@link verifyStrip}, and if not, what is wrong with it. */
export type StripCheck = { ok: true } | { ok: false; reason: string };

/** The ways the stand-in model gets a strip wrong; see {@link defectOf}. */
export type Defect = "blank-frame" | "wrong-size";

/**
 * Read a character config from a `.json`, `.yaml` or `.yml` file and validate it.
 * Every failure (unreadable file, bad syntax, invalid fields) is an Error whose message names the file.
 * @example
 * const config = await loadCharacterConfig("graphs/assets/knight.yaml");
 * config.rows.map((r) => r.animation); // ["idle", "walk", "attack", "hurt", "die"]
 */
export async function loadCharacterConfig(path: string): Promise<CharacterConfig> {
  const ext = extname(path).toLowerCase();
  if (ext !== ".json" && ext !== ".yaml" && ext !== ".yml") {
    throw new Error(`Cannot load character config ${path}: unsupported extension "${ext}"; use .json, .yaml or .yml.`);
  }
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (cause) {
    throw new Error(`Cannot read character config ${path}: ${messageOf(cause)}`, { cause });
  }
  let raw: unknown;
  try {
    raw = ext === ".json" ? JSON.parse(text) : parseYaml(text);
  } catch (cause) {
    throw new Error(`Character config ${path} is not valid ${ext === ".json" ? "JSON" : "YAML"}: ${messageOf(cause)}`, { cause });
  }
  const result = CharacterConfig.safeParse(raw);
  if (!result.success) {
    throw new Error(`Invalid character config ${path}:\n${z.prettifyError(result.error)}`, { cause: result.error });
  }
  return result.data;
}

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/** Decode a PNG of any colour type and bit depth to 8-bit RGBA. Throws if the bytes are not a valid PNG. */
export function decodePng(bytes: Uint8Array): RgbaImage {
  // pngjs reports garbage as a stream error ("read requests waiting on finished stream"), so check the
  // signature first to say plainly what is wrong.
  if (bytes.length < PNG_SIGNATURE.length || PNG_SIGNATURE.some((b, i) => bytes[i] !== b)) {
    throw new Error(`The ${bytes.length} bytes are not a valid PNG: they do not start with the PNG signature.`);
  }
  let png: PNG;
  try {
    png = PNG.sync.read(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
  } catch (cause) {
    throw new Error(`The ${bytes.length} bytes are not a valid PNG: ${messageOf(cause)}`, { cause });
  }
  return { width: png.width, height: png.height, data: new Uint8Array(png.data.buffer, png.data.byteOffset, png.data.byteLength) };
}

/** Encode an RGBA image as an 8-bit RGBA PNG. The same image always gives the same bytes. */
export function encodePng(image: RgbaImage): Uint8Array {
  const { width, height, data } = image;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new Error(`Cannot encode a ${width}×${height} image as PNG: both sides must be positive integers.`);
  }
  if (data.length !== width * height * 4) {
    throw new Error(`Cannot encode a ${width}×${height} image as PNG: it has ${data.length} bytes of pixels, expected ${width * height * 4} (RGBA).`);
  }
  const png = new PNG({ width, height });
  png.data = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const out = PNG.sync.write(png, { colorType: 6 });
  return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
}

const DEFAULT_PALETTE = ["#4a5a70", "#f2c9a0", "#2e2e38", "#c8ccd4"];

/**
 * Draw a simple character filling one `frameSize`×`frameSize` frame on a transparent background. The
 * palette colours go, in order, to the torso, head, legs and sword (repeating if there are fewer than
 * four); the proportions come from the seed (the config's, or a hash of its name), so the same config
 * always draws the same character.
 */
export function drawBase(config: CharacterConfig): RgbaImage {
  const s = config.frameSize;
  const rand = seededRandom(config.seed ?? hashText(config.name));
  const palette = (config.palette ?? DEFAULT_PALETTE).map(parseHex);
  const colour = (part: number): Rgb => palette[part % palette.length]!;
  const image = blankImage(s, s);

  const headR = s * (0.13 + rand() * 0.05);
  const torsoHalf = s * (0.14 + rand() * 0.06);
  const legGap = s * (0.03 + rand() * 0.03);
  fillRect(image, s * 0.35, s * 0.68, s * 0.5 - legGap, s * 0.92, colour(2));
  fillRect(image, s * 0.5 + legGap, s * 0.68, s * 0.65, s * 0.92, colour(2));
  fillRect(image, s * 0.5 - torsoHalf, s * 0.4, s * 0.5 + torsoHalf, s * 0.7, colour(0));
  fillCircle(image, s * 0.5, s * 0.26, headR, colour(1));
  fillRect(image, s * 0.74, s * 0.22, s * 0.8, s * 0.72, colour(3));
  // An eye on one side makes the figure asymmetric, so small rotations still move visible pixels.
  fillCircle(image, s * 0.5 + headR * 0.45, s * 0.24, Math.max(0.6, s * 0.03), [20, 20, 28]);
  return image;
}

/**
 * Which defect, if any, the stand-in model puts in row `rowIndex` on its `attempt`-th try (1-based).
 *
 * The rule: a row's fate is one seeded draw `r` in [0, 1) from `(seed, rowIndex)`.
 * - attempt 1: the row is defective when `r < 0.30` (about 30% of rows);
 * - attempt 2: only when `r < 0.05` (a rare "stubborn" row, about 5%, still wrong after one retry);
 * - attempt 3 and later: never.
 * The kind is a second draw: "blank-frame" (one frame fully transparent) or "wrong-size" (the strip is
 * cropped to 3/4 of the frame height), and stays the same across attempts. So a workflow that allows two
 * attempts per row fails on stubborn rows, and one that allows three always finishes.
 */
export function defectOf(seed: number, rowIndex: number, attempt: number): Defect | null {
  if (!Number.isInteger(attempt) || attempt < 1) throw new RangeError(`attempt must be an integer of at least 1, got ${attempt}`);
  const rand = seededRandom(hashText(`${seed}:${rowIndex}`));
  const r = rand();
  const kind: Defect = rand() < 0.5 ? "blank-frame" : "wrong-size";
  const threshold = attempt === 1 ? 0.3 : attempt === 2 ? 0.05 : 0;
  return r < threshold ? kind : null;
}

/**
 * Render one animation row as a PNG strip: `row.frames` frames of the base image side by side, each posed
 * for the animation and frame, `frames * size` wide and `size` tall (`size` is the base's side). When
 * {@link defectOf} says so for `(seed, rowIndex, attempt)`, the strip has that defect, as a model's would.
 */
export function drawStrip(base: RgbaImage, row: AnimationRow, rowIndex: number, attempt: number, seed: number): Uint8Array {
  const size = base.width;
  if (base.height !== size) throw new Error(`The base image must be square, got ${base.width}×${base.height}.`);
  const strip = blankImage(row.frames * size, size);
  for (let i = 0; i < row.frames; i += 1) {
    blit(renderPose(base, poseOf(row.animation, i, row.frames, size)), strip, i * size, 0);
  }
  const defect = defectOf(seed, rowIndex, attempt);
  if (defect === "blank-frame") {
    // Which frame goes blank is seeded too, and independent of the draws defectOf makes.
    const frame = Math.floor(seededRandom(hashText(`${seed}:${rowIndex}:${attempt}:frame`))() * row.frames);
    clearRect(strip, frame * size, 0, size, size);
  } else if (defect === "wrong-size") {
    return encodePng(crop(strip, strip.width, Math.round(size * 0.75)));
  }
  return encodePng(strip);
}

/**
 * Check a strip on its decoded pixels: it is a PNG, it measures `row.frames * frameSize` × `frameSize`,
 * no frame is blank (every alpha 0), and no two consecutive frames are identical (a frozen animation).
 */
export function verifyStrip(bytes: Uint8Array, row: AnimationRow, frameSize: number): StripCheck {
  let image: RgbaImage;
  try {
    image = decodePng(bytes);
  } catch (error) {
    return { ok: false, reason: messageOf(error) };
  }
  const width = row.frames * frameSize;
  if (image.width !== width || image.height !== frameSize) {
    return { ok: false, reason: `strip is ${image.width}×${image.height} px, expected ${width}×${frameSize} (${row.frames} frames of ${frameSize} px)` };
  }
  const frames = Array.from({ length: row.frames }, (_, i) => crop(image, frameSize, frameSize, i * frameSize));
  const blank = frames.findIndex((f) => f.data.every((v, j) => j % 4 !== 3 || v === 0));
  if (blank !== -1) return { ok: false, reason: `frame ${blank + 1} of ${row.frames} is blank (fully transparent)` };
  for (let i = 1; i < frames.length; i += 1) {
    if (sameBytes(frames[i - 1]!.data, frames[i]!.data)) {
      return { ok: false, reason: `frames ${i} and ${i + 1} of ${row.frames} are identical` };
    }
  }
  return { ok: true };
}

/**
 * Stack row strips top to bottom into one sheet PNG, as wide as the widest strip; shorter rows are padded
 * with transparent pixels on the right. Strips must be `frameSize` tall and whole frames wide (verify them
 * first); anything else is an Error naming the strip.
 */
export function assembleSheet(strips: Uint8Array[], frameSize: number): Uint8Array {
  if (strips.length === 0) throw new Error("Cannot assemble a sprite sheet from no strips.");
  const images = strips.map((bytes, i) => {
    const image = decodePng(bytes);
    if (image.height !== frameSize || image.width % frameSize !== 0) {
      throw new Error(`Strip ${i} is ${image.width}×${image.height} px; each strip must be ${frameSize} px tall and a multiple of ${frameSize} px wide.`);
    }
    return image;
  });
  const sheet = blankImage(Math.max(...images.map((image) => image.width)), images.length * frameSize);
  images.forEach((image, i) => blit(image, sheet, 0, i * frameSize));
  return encodePng(sheet);
}

type Rgb = readonly [number, number, number];

/** How one frame differs from the base: a shift, a rotation about the centre, a colour tint and a fade. */
interface Pose {
  dx: number;
  dy: number;
  degrees: number;
  tint: { colour: Rgb; amount: number } | null;
  opacity: number;
}

/**
 * The pose of frame `i` of `n`. Shifts are in units of 1/16 of the frame (at least 1 px). Every animation
 * alternates or steadily changes something each frame, so consecutive frames always differ and a correct
 * strip passes the identical-frames check of {@link verifyStrip}.
 */
function poseOf(animation: string, i: number, n: number, size: number): Pose {
  const u = Math.max(1, Math.round(size / 16));
  const bob = i % 2;
  const progress = n > 1 ? i / (n - 1) : 0;
  const still: Pose = { dx: 0, dy: 0, degrees: 0, tint: null, opacity: 1 };
  switch (animation) {
    case "idle":
      return { ...still, dy: bob * u };
    case "walk":
      return { ...still, dx: [0, 1, 0, -1][i % 4]! * u, dy: -bob * u };
    case "attack":
      // Wind up (lean back), then swing forward while lunging.
      return { ...still, dx: Math.round(progress * 2 * u), dy: bob * u, degrees: -15 + 60 * progress };
    case "hurt":
      // Knocked back, flashing red on alternate frames.
      return { ...still, dx: -(1 + bob) * u, tint: { colour: [230, 40, 40], amount: bob ? 0.35 : 0.7 } };
    case "die":
      // Topple over and fade; the last frame stays faintly visible so it is not a blank frame.
      return { ...still, dy: Math.round(progress * 3 * u), degrees: 90 * progress, opacity: 1 - 0.7 * progress };
    default:
      return { ...still, dx: ((i % 3) - 1) * u, dy: bob * u };
  }
}

/** The base image in `pose`, sampled nearest-neighbour so pixel art stays crisp. */
function renderPose(base: RgbaImage, pose: Pose): RgbaImage {
  const { width, height } = base;
  const out = blankImage(width, height);
  const cx = (width - 1) / 2;
  const cy = (height - 1) / 2;
  const rad = (pose.degrees * Math.PI) / 180;
  const cos = Math.cos(rad);
  const sin = Math.sin(rad);
  for (let y = 0; y < height; y += 1) {
    for (let x = 0; x < width; x += 1) {
      // Map each output pixel back to the base pixel that lands on it (inverse shift, then inverse rotation).
      const ox = x - pose.dx - cx;
      const oy = y - pose.dy - cy;
      const sx = Math.round(cx + ox * cos + oy * sin);
      const sy = Math.round(cy - ox * sin + oy * cos);
      if (sx < 0 || sy < 0 || sx >= width || sy >= height) continue;
      const from = (sy * width + sx) * 4;
      const to = (y * width + x) * 4;
      const alpha = base.data[from + 3]!;
      if (alpha === 0) continue;
      for (let c = 0; c < 3; c += 1) {
        const v = base.data[from + c]!;
        out.data[to + c] = pose.tint ? Math.round(v + (pose.tint.colour[c]! - v) * pose.tint.amount) : v;
      }
      out.data[to + 3] = Math.max(1, Math.round(alpha * pose.opacity));
    }
  }
  return out;
}

function blankImage(width: number, height: number): RgbaImage {
  return { width, height, data: new Uint8Array(width * height * 4) };
}

/** Fill the pixels whose centres lie in [x0, x1) × [y0, y1), clipped to the image. */
function fillRect(image: RgbaImage, x0: number, y0: number, x1: number, y1: number, [r, g, b]: Rgb): void {
  for (let y = Math.max(0, Math.round(y0)); y < Math.min(image.height, Math.round(y1)); y += 1) {
    for (let x = Math.max(0, Math.round(x0)); x < Math.min(image.width, Math.round(x1)); x += 1) {
      image.data.set([r, g, b, 255], (y * image.width + x) * 4);
    }
  }
}

/** Fill the pixels whose centres lie within `radius` of (cx, cy). */
function fillCircle(image: RgbaImage, cx: number, cy: number, radius: number, [r, g, b]: Rgb): void {
  for (let y = 0; y < image.height; y += 1) {
    for (let x = 0; x < image.width; x += 1) {
      if ((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= radius ** 2) image.data.set([r, g, b, 255], (y * image.width + x) * 4);
    }
  }
}

function clearRect(image: RgbaImage, x0: number, y0: number, width: number, height: number): void {
  for (let y = y0; y < y0 + height; y += 1) image.data.fill(0, (y * image.width + x0) * 4, (y * image.width + x0 + width) * 4);
}

/** Copy all of `src` into `dst` with its top-left corner at (x0, y0); `src` must fit. */
function blit(src: RgbaImage, dst: RgbaImage, x0: number, y0: number): void {
  for (let y = 0; y < src.height; y += 1) {
    dst.data.set(src.data.subarray(y * src.width * 4, (y + 1) * src.width * 4), ((y0 + y) * dst.width + x0) * 4);
  }
}

/** The `width`×`height` region of `image` whose top-left corner is (x0, 0). */
function crop(image: RgbaImage, width: number, height: number, x0 = 0): RgbaImage {
  const out = blankImage(width, height);
  for (let y = 0; y < height; y += 1) {
    out.data.set(image.data.subarray((y * image.width + x0) * 4, (y * image.width + x0 + width) * 4), y * width * 4);
  }
  return out;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

function parseHex(hex: string): Rgb {
  const digits = hex.slice(1);
  const n = parseInt(digits.length === 3 ? [...digits].map((d) => d + d).join("") : digits, 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
