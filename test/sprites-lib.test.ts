import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { PNG } from "pngjs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  assembleSheet,
  decodePng,
  defectOf,
  drawBase,
  drawStrip,
  encodePng,
  loadCharacterConfig,
  verifyStrip,
  type AnimationRow,
  type CharacterConfig,
  type RgbaImage,
} from "../graphs/lib/sprites.ts";

/*
 * The sprite stand-in used by graphs/spritesheet.ts: real PNG bytes in and out, a defect schedule that
 * is a pure function of (seed, row, attempt), and a verifier that must tell defective strips from good ones.
 */

const KNIGHT = fileURLToPath(new URL("../graphs/assets/knight.yaml", import.meta.url));
const KNIGHT_PNG = fileURLToPath(new URL("../graphs/assets/knight.png", import.meta.url));

const knight: CharacterConfig = {
  name: "knight",
  frameSize: 32,
  palette: ["#4a5a70", "#f2c9a0", "#2e2e38", "#c8ccd4"],
  seed: 1,
  rows: [
    { animation: "idle", frames: 4 },
    { animation: "walk", frames: 6 },
    { animation: "attack", frames: 5 },
    { animation: "hurt", frames: 3 },
    { animation: "die", frames: 6 },
  ],
};

/** The first (seed, row index) at or after seed 0 whose first attempt has `defect`. */
function firstWith(defect: "blank-frame" | "wrong-size"): { seed: number; rowIndex: number } {
  for (let seed = 0; seed < 1000; seed += 1) {
    if (defectOf(seed, 0, 1) === defect) return { seed, rowIndex: 0 };
  }
  return expect.fail(`no seed below 1000 gives row 0 a ${defect} on attempt 1`);
}

function frameOf(image: RgbaImage, frameSize: number, column: number, row = 0): number[] {
  const out: number[] = [];
  for (let y = row * frameSize; y < (row + 1) * frameSize; y += 1) {
    const start = (y * image.width + column * frameSize) * 4;
    out.push(...image.data.subarray(start, start + frameSize * 4));
  }
  return out;
}

describe("PNG encoding", () => {
  it("round-trips RGBA pixels exactly", () => {
    const data = Uint8Array.from({ length: 5 * 3 * 4 }, (_, i) => (i * 37) % 256);
    const bytes = encodePng({ width: 5, height: 3, data });
    expect([...bytes.subarray(1, 4)].map((c) => String.fromCharCode(c)).join("")).toBe("PNG");
    const image = decodePng(bytes);
    expect(image.width).toBe(5);
    expect(image.height).toBe(3);
    expect([...image.data]).toEqual([...data]);
  });

  it("decodes a greyscale PNG to RGBA", () => {
    const grey = new PNG({ width: 2, height: 1 });
    grey.data = Buffer.from([10, 10, 10, 255, 200, 200, 200, 255]);
    const image = decodePng(PNG.sync.write(grey, { colorType: 0 }));
    expect([...image.data]).toEqual([10, 10, 10, 255, 200, 200, 200, 255]);
  });

  it("says when bytes are not a PNG", () => {
    expect(() => decodePng(new TextEncoder().encode("definitely not an image"))).toThrow(
      "The 23 bytes are not a valid PNG: they do not start with the PNG signature.",
    );
    const truncated = encodePng(drawBase(knight)).subarray(0, 40);
    expect(() => decodePng(truncated)).toThrow(/^The 40 bytes are not a valid PNG: /);
  });

  it("refuses pixel data of the wrong length", () => {
    expect(() => encodePng({ width: 2, height: 2, data: new Uint8Array(12) })).toThrow("it has 12 bytes of pixels, expected 16 (RGBA)");
  });

  it("ships knight.png as drawBase draws the knight config", async () => {
    const asset = decodePng(await readFile(KNIGHT_PNG));
    const drawn = drawBase(knight);
    expect([asset.width, asset.height]).toEqual([32, 32]);
    // If drawBase changes, regenerate the asset: writeFile(KNIGHT_PNG, encodePng(drawBase(config))).
    expect([...asset.data]).toEqual([...drawn.data]);
  });
});

describe("drawBase", () => {
  it("draws an opaque figure on a transparent background, the same every time", () => {
    const image = drawBase(knight);
    const alphas = [...image.data].filter((_, i) => i % 4 === 3);
    expect(alphas.filter((a) => a === 255).length).toBeGreaterThan(32 * 32 * 0.15);
    expect(alphas[0]).toBe(0);
    expect([...drawBase(knight).data]).toEqual([...image.data]);
    expect([...drawBase({ ...knight, seed: 2 }).data]).not.toEqual([...image.data]);
  });
});

describe("defectOf", () => {
  it("spoils about 30% of rows on attempt 1, a subset of those on attempt 2, and none after", () => {
    const rows = Array.from({ length: 2000 }, (_, i) => i);
    const first = rows.map((i) => defectOf(9, i, 1));
    const second = rows.map((i) => defectOf(9, i, 2));
    const rate = first.filter((d) => d !== null).length / rows.length;
    expect(rate).toBeGreaterThan(0.26);
    expect(rate).toBeLessThan(0.34);
    const stubborn = second.filter((d) => d !== null).length / rows.length;
    expect(stubborn).toBeGreaterThan(0.03);
    expect(stubborn).toBeLessThan(0.07);
    // A row still wrong on attempt 2 was wrong the same way on attempt 1.
    rows.forEach((i) => {
      if (second[i] !== null) expect(first[i]).toBe(second[i]);
    });
    expect(new Set(first)).toEqual(new Set([null, "blank-frame", "wrong-size"]));
    expect(rows.some((i) => defectOf(9, i, 3) !== null)).toBe(false);
  });

  it("gives the schedule the knight example documents", () => {
    expect([0, 1, 2, 3, 4].map((i) => defectOf(1, i, 1))).toEqual(["blank-frame", null, null, null, "wrong-size"]);
    expect([0, 1, 2, 3, 4].map((i) => defectOf(1, i, 2))).toEqual([null, null, null, null, null]);
    expect(defectOf(14, 2, 2)).toBe("blank-frame");
  });

  it("rejects attempts that are not 1-based integers", () => {
    expect(() => defectOf(1, 0, 0)).toThrow("attempt must be an integer of at least 1, got 0");
  });
});

describe("drawStrip and verifyStrip", () => {
  const base = drawBase(knight);
  const walk: AnimationRow = { animation: "walk", frames: 6 };

  it("is deterministic and draws frames side by side", () => {
    const bytes = drawStrip(base, walk, 1, 1, 1);
    expect(defectOf(1, 1, 1)).toBeNull();
    expect([...drawStrip(base, walk, 1, 1, 1)]).toEqual([...bytes]);
    const image = decodePng(bytes);
    expect([image.width, image.height]).toEqual([6 * 32, 32]);
    expect(frameOf(image, 32, 0)).not.toEqual(frameOf(image, 32, 1));
    expect(verifyStrip(bytes, walk, 32)).toEqual({ ok: true });
  });

  it("catches a blank frame", () => {
    const { seed, rowIndex } = firstWith("blank-frame");
    const image = decodePng(drawStrip(base, walk, rowIndex, 1, seed));
    const blank = [0, 1, 2, 3, 4, 5].filter((f) => frameOf(image, 32, f).every((v, i) => i % 4 !== 3 || v === 0));
    expect(blank).toHaveLength(1);
    expect(verifyStrip(drawStrip(base, walk, rowIndex, 1, seed), walk, 32)).toEqual({
      ok: false,
      reason: `frame ${blank[0]! + 1} of 6 is blank (fully transparent)`,
    });
  });

  it("catches a strip of the wrong size", () => {
    const { seed, rowIndex } = firstWith("wrong-size");
    expect(verifyStrip(drawStrip(base, walk, rowIndex, 1, seed), walk, 32)).toEqual({
      ok: false,
      reason: "strip is 192×24 px, expected 192×32 (6 frames of 32 px)",
    });
    expect(verifyStrip(drawStrip(base, walk, rowIndex, 3, seed), walk, 32)).toEqual({ ok: true });
  });

  it("catches a frozen animation, a wrong frame count and bytes that are not a PNG", () => {
    const frozen = { width: 64, height: 32, data: new Uint8Array(64 * 32 * 4) };
    for (let y = 0; y < 32; y += 1) {
      frozen.data.set(base.data.subarray(y * 128, (y + 1) * 128), y * 256);
      frozen.data.set(base.data.subarray(y * 128, (y + 1) * 128), y * 256 + 128);
    }
    expect(verifyStrip(encodePng(frozen), { animation: "idle", frames: 2 }, 32)).toEqual({ ok: false, reason: "frames 1 and 2 of 2 are identical" });
    expect(verifyStrip(drawStrip(base, walk, 1, 1, 1), { animation: "walk", frames: 5 }, 32)).toMatchObject({ ok: false });
    expect(verifyStrip(new Uint8Array([1, 2, 3]), walk, 32)).toEqual({
      ok: false,
      reason: "The 3 bytes are not a valid PNG: they do not start with the PNG signature.",
    });
  });

  it("agrees with defectOf on every attempt, animation and frame count", () => {
    for (const frameSize of [8, 32]) {
      const small = drawBase({ ...knight, frameSize });
      for (const animation of ["idle", "walk", "attack", "hurt", "die", "cast"]) {
        for (let frames = 1; frames <= 16; frames += 1) {
          for (const attempt of [1, 2, 3]) {
            const rowIndex = frames;
            const seed = frameSize + animation.length;
            const check = verifyStrip(drawStrip(small, { animation, frames }, rowIndex, attempt, seed), { animation, frames }, frameSize);
            expect(check.ok, `${animation} × ${frames} at ${frameSize} px, attempt ${attempt}: ${JSON.stringify(check)}`).toBe(
              defectOf(seed, rowIndex, attempt) === null,
            );
          }
        }
      }
    }
  });
});

describe("assembleSheet", () => {
  it("stacks strips into rows, padding short ones with transparent pixels", () => {
    const base = drawBase(knight);
    const strips = knight.rows.map((row, i) => drawStrip(base, row, i, 3, 1));
    const sheet = decodePng(assembleSheet(strips, 32));
    expect([sheet.width, sheet.height]).toEqual([6 * 32, 5 * 32]);
    knight.rows.forEach((row, k) => {
      const strip = decodePng(strips[k]!);
      for (let f = 0; f < row.frames; f += 1) expect(frameOf(sheet, 32, f, k)).toEqual(frameOf(strip, 32, f));
      for (let f = row.frames; f < 6; f += 1) expect(frameOf(sheet, 32, f, k).every((v) => v === 0)).toBe(true);
    });
  });

  it("refuses a strip that is not one frame tall", () => {
    const base = drawBase(knight);
    const { seed, rowIndex } = firstWith("wrong-size");
    const strips = [drawStrip(base, knight.rows[0]!, 0, 3, 1), drawStrip(base, knight.rows[1]!, rowIndex, 1, seed)];
    expect(() => assembleSheet(strips, 32)).toThrow("Strip 1 is 192×24 px; each strip must be 32 px tall and a multiple of 32 px wide.");
  });
});

describe("loadCharacterConfig", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "cairn-sprites-"));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("loads the knight YAML asset", async () => {
    expect(await loadCharacterConfig(KNIGHT)).toEqual(knight);
  });

  it("loads YAML and JSON, applying the default frame size", async () => {
    const config = { name: "slime", rows: [{ animation: "bounce", frames: 3 }], palette: ["#0f0"] };
    const json = join(dir, "slime.json");
    const yml = join(dir, "slime.yml");
    await writeFile(json, JSON.stringify(config));
    await writeFile(yml, "name: slime\nrows:\n  - animation: bounce\n    frames: 3\npalette: ['#0f0']\n");
    const expected = { ...config, frameSize: 32 };
    expect(await loadCharacterConfig(json)).toEqual(expected);
    expect(await loadCharacterConfig(yml)).toEqual(expected);
  });

  it("names the file and every failing field", async () => {
    const path = join(dir, "bad.yaml");
    await writeFile(path, "name: goblin\nframeSize: 4\nframe_size: 8\nrows:\n  - { animation: run, frames: 20 }\npalette: [red]\n");
    const error = await loadCharacterConfig(path).then(
      () => expect.fail("expected the config to be rejected"),
      (e: unknown) => e as Error,
    );
    expect(error).toBeInstanceOf(Error);
    expect(error.message).toContain(`Invalid character config ${path}:`);
    expect(error.message).toContain('Unrecognized key: "frame_size"');
    expect(error.message).toContain("→ at frameSize");
    expect(error.message).toContain("→ at rows[0].frames");
    expect(error.message).toContain("expected a hex colour such as #c0392b or #fff\n  → at palette[0]");
  });

  it("says when the file is missing, malformed or of an unknown kind", async () => {
    await expect(loadCharacterConfig(join(dir, "missing.yaml"))).rejects.toThrow(`Cannot read character config ${join(dir, "missing.yaml")}: ENOENT`);
    const broken = join(dir, "broken.json");
    await writeFile(broken, "{ name: ");
    await expect(loadCharacterConfig(broken)).rejects.toThrow(`Character config ${broken} is not valid JSON: `);
    await expect(loadCharacterConfig(join(dir, "knight.toml"))).rejects.toThrow('unsupported extension ".toml"; use .json, .yaml or .yml.');
  });
});
