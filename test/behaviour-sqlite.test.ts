import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { behaviourSuite } from "./behaviour/cases.ts";

behaviourSuite("behaviour: sqlite store", async () => {
  const dir = await mkdtemp(join(tmpdir(), "cairn-behaviour-sqlite-"));
  return { uri: `sqlite:${join(dir, "x.db")}`, cleanup: () => rm(dir, { recursive: true, force: true }) };
});
