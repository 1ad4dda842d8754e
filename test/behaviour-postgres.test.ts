import { describe } from "vitest";
import { behaviourSuite } from "./behaviour/cases.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

// In CI an unreachable server fails this file; elsewhere it is skipped with the reason printed.
const postgres = await requirePostgresInCI();

describe.skipIf(!postgres.ok)("postgres", () => {
  behaviourSuite("behaviour: postgres store", async () => {
    const schema = uniqueSchema("cairn_behaviour");
    return { uri: postgresUri(schema), cleanup: () => dropSchema(schema) };
  });
});
