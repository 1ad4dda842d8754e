import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

export default defineConfig({
  resolve: {
    alias: { cairn: fileURLToPath(new URL("./src/index.ts", import.meta.url)) },
  },
  test: {
    // The LangGraph conformance suite calls describe/it as globals.
    globals: true,
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Child-process tests spawn the CLI; keep the two cores from thrashing.
    maxWorkers: 2,
  },
});
