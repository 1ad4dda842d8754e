import type { BaseCheckpointSaver } from "@langchain/langgraph-checkpoint";
import { validate } from "@langchain/langgraph-checkpoint-validation";
import { describe } from "vitest";
import { openStore, type OpenedStore } from "../src/store/open.ts";
import { dropSchema, postgresUri, requirePostgresInCI, truncateCheckpoints, uniqueSchema } from "./helpers/postgres.ts";

// LangGraph's own checkpoint-saver contract, run against the saver `postgres://…` opens. One schema for the
// file, emptied after each checkpointer: some cases list every thread and expect only their own.
const postgres = await requirePostgresInCI();
const schema = uniqueSchema();
const opened = new Map<BaseCheckpointSaver, OpenedStore>();

describe.skipIf(!postgres.ok)("postgres store conformance", () => {
  validate({
    checkpointerName: "cairn postgres store",
    async createCheckpointer() {
      const store = await openStore(postgresUri(schema));
      opened.set(store.saver, store);
      return store.saver;
    },
    async destroyCheckpointer(saver) {
      const store = opened.get(saver)!;
      opened.delete(saver);
      await store.close();
      await truncateCheckpoints(schema);
    },
    async afterAll() {
      await dropSchema(schema);
    },
  });
});
