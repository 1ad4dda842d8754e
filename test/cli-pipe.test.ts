/**
 * The CLI as one stage of a shell pipeline: a reader that stops early closes the pipe, and the command
 * must end quietly with its own exit code rather than crash on EPIPE.
 */
import { execFile } from "node:child_process";
import { afterAll, expect, it } from "vitest";
import { BIN, cairn, childEnv, removeWorkdirs, workdir } from "./helpers/cli.ts";

afterAll(removeWorkdirs);

it("a command whose reader stops early (| head) exits 0 without an EPIPE error", async () => {
  const cwd = await workdir();
  expect((await cairn(cwd, ["run", "graphs/moral-video.ts", "--thread", "piped"])).code).toBe(0);
  // The export document is far larger than what head reads, so cairn keeps writing after the pipe closed.
  const script = `set -o pipefail; "${process.execPath}" "${BIN}" export piped | head -c 64 > /dev/null`;
  const result = await new Promise<{ code: number; stderr: string }>((resolve) => {
    execFile("bash", ["-c", script], { cwd, env: childEnv() }, (error, _stdout, stderr) => resolve({ code: error ? Number(error.code) : 0, stderr }));
  });
  expect(result.stderr).not.toContain("EPIPE");
  expect(result.code).toBe(0);
}, 120_000);
