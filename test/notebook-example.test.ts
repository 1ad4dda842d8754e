import { execFile } from "node:child_process";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

/*
 * examples/notebook.ts is documentation: run it the way its header says (tsx as the loader; `node
 * --import tsx` is `npx tsx` without npx's start-up), against a store in a temp dir via CAIRN_STORE, and
 * check that what it prints matches what it claims.
 */

const ROOT = fileURLToPath(new URL("..", import.meta.url));

let dir: string;
let result: { code: number; stdout: string; stderr: string };

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "cairn-notebook-test-"));
  const env: NodeJS.ProcessEnv = { ...process.env, CAIRN_STORE: `file:${join(dir, "store")}` };
  delete env.OPENAI_API_KEY;
  result = await new Promise((resolve, reject) => {
    execFile(process.execPath, ["--import", "tsx", "examples/notebook.ts"], { cwd: ROOT, env, timeout: 40_000 }, (error, stdout, stderr) => {
      if (error && typeof error.code !== "number") reject(new Error(`examples/notebook.ts did not finish (${error.signal ?? error.code}): ${stderr}`));
      else resolve({ code: error ? (error.code as number) : 0, stdout, stderr });
    });
  });
}, 60_000);

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("examples/notebook.ts", () => {
  it("exits 0 and writes into the store CAIRN_STORE names", async () => {
    expect(result.code, result.stderr).toBe(0);
    const thread = /^Ran thread (\S+) \(\d+ tasks\) into file:(.+)$/m.exec(result.stdout);
    expect(thread?.[2]).toBe(join(dir, "store"));
    expect(await readdir(join(dir, "store", "threads"))).toEqual([thread?.[1]]);
    expect(result.stdout).toContain(`npx cairn history ${thread?.[1]} --store file:${join(dir, "store")}`);
  });

  it("prints the history, one line per checkpoint", () => {
    expect(result.stdout).toContain("History (9 checkpoints):");
    for (const step of ["input", "context_analyzer", "web_researcher", "story_generator", "script_segmenter", "character_designer", "video_assembler"]) {
      expect(result.stdout).toMatch(new RegExp(`^\\s+\\d+\\s+${step}\\s+\\d+ms\\s+[0-9a-f-]{36}$`, "m"));
    }
  });

  it("tries story_generator on a changed moral without writing anything", () => {
    expect(result.stdout).toContain(`Before story_generator: moral "honesty is worth more than what it costs", 2 research notes`);
    const old = /^ {2}old story: (.+)$/m.exec(result.stdout)?.[1];
    const draft = /^ {2}new story: (.+)$/m.exec(result.stdout)?.[1];
    expect(old).toHaveLength(80);
    expect(draft).toHaveLength(80);
    expect(draft).not.toBe(old);
    expect(result.stdout).toContain("checkpoints before tryStep: 9, after: 9 (nothing written)");
  });

  // stateBefore reads a checkpoint's raw channels; LangGraph's routing channel (`branch:to:story_generator`)
  // must not come back as a field (it did before d8c2baa).
  it("loads stateBefore with the state's fields only", () => {
    const fields = /^ {2}fields: (.+)$/m.exec(result.stdout)?.[1]?.split(", ");
    expect(fields).toEqual(["topic", "moral", "audience", "sceneCount", "delayMs", "seed", "segments", "scenes", "context", "research"]);
  });

  it("reruns only video_assembler with continueFrom, as a fork", () => {
    expect(result.stdout).toMatch(/^continueFrom\("video_assembler"\): completed, 1 task\(s\) run, video of \d+s$/m);
    expect(result.stdout).toContain("checkpoints: 9 before, 11 after\n  new: restart:video_assembler\n  new: video_assembler\n");
  });
});
