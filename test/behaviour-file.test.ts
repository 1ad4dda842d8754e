import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { behaviourSuite } from "./behaviour/cases.ts";

behaviourSuite("behaviour: file store", async () => {
  const dir = await mkdtemp(join(tmpdir(), "cairn-behaviour-file-"));
  return { uri: `file:${dir}`, cleanup: () => rm(dir, { recursive: true, force: true }) };
});
