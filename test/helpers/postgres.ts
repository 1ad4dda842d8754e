import { randomBytes } from "node:crypto";
import pg from "pg";

/**
 * The test server. CI may point elsewhere with `CAIRN_TEST_POSTGRES_URI`; the default is the local
 * trust-auth server on 127.0.0.1:5432, database `test`.
 */
const BASE_URI = process.env.CAIRN_TEST_POSTGRES_URI ?? "postgres://postgres@127.0.0.1:5432/test";

/** A schema name no other test run uses, so parallel files and earlier crashed runs cannot interfere. */
export function uniqueSchema(prefix = "cairn_test"): string {
  return `${prefix}_${randomBytes(6).toString("hex")}`;
}

/** The store URI for the test server, scoped to `schema` with cairn's `?schema=` parameter. */
export function postgresUri(schema: string): string {
  const url = new URL(BASE_URI);
  url.searchParams.set("schema", schema);
  return url.toString();
}

/** Whether the test server answers a query, and if not, why. */
export async function postgresReachable(): Promise<{ ok: boolean; reason?: string }> {
  const client = new pg.Client({ connectionString: BASE_URI, connectionTimeoutMillis: 3_000 });
  client.on("error", () => {});
  try {
    await client.connect();
    await client.query("SELECT 1");
    return { ok: true };
  } catch (error) {
    const message = error instanceof Error ? error.message || (error as NodeJS.ErrnoException).code : String(error);
    return { ok: false, reason: `no Postgres server answered at ${masked(BASE_URI)} (${message})` };
  } finally {
    await client.end().catch(() => {});
  }
}

/**
 * Check the server once, at collection time (`await` it at the top of a test file). In CI
 * (`CI=true`) an unreachable server throws, failing the file; elsewhere it warns with the reason and
 * returns `ok: false` for `describe.skipIf(!status.ok)`.
 */
export async function requirePostgresInCI(): Promise<{ ok: boolean; reason?: string }> {
  const status = await postgresReachable();
  if (status.ok) return status;
  if (process.env.CI === "true") {
    throw new Error(`CI=true requires the Postgres tests to run, but ${status.reason}. Start the server or set CAIRN_TEST_POSTGRES_URI.`);
  }
  console.warn(`Skipping Postgres tests: ${status.reason}. Start a server (or set CAIRN_TEST_POSTGRES_URI) to run them.`);
  return status;
}

/** Drop a test schema and everything in it. */
export async function dropSchema(schema: string): Promise<void> {
  await withClient((client) => client.query(`DROP SCHEMA IF EXISTS ${quoteIdent(schema)} CASCADE`));
}

/** Empty the checkpoint tables of a schema set up by PostgresSaver, keeping the tables. */
export async function truncateCheckpoints(schema: string): Promise<void> {
  const s = quoteIdent(schema);
  await withClient((client) => client.query(`TRUNCATE ${s}.checkpoints, ${s}.checkpoint_blobs, ${s}.checkpoint_writes`));
}

async function withClient<T>(fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: BASE_URI, connectionTimeoutMillis: 3_000 });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

function quoteIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

function masked(uri: string): string {
  const url = new URL(uri);
  if (url.password) url.password = "***";
  return url.toString();
}
