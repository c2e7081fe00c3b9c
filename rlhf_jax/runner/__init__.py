"""The one loop every stage and script uses: mesh, sharded state, jit, steps."""
