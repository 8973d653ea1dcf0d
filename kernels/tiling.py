"""Program-to-tile mapping shared by the GEMM kernels: which tile a program computes, and its offsets."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 GROUP: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP row-tiles run over each
    column-tile together, so the weight tile they share is still in L2 for all of them."""
    num_pid_rows = tl.cdiv(rows, BLOCK_ROWS)
    num_pid_cols = tl.cdiv(cols, BLOCK_COLS)
    num_pid_in_group = GROUP * num_pid_cols
    first_pid_row = (pid // num_pid_in_group) * GROUP
    group_size = min(num_pid_rows - first_pid_row, GROUP)
    pid_row = first_pid_row + (pid % num_pid_in_group) % group_size
    pid_col = (pid % num_pid_in_group) // group_size
    return pid_row, pid_col


@triton.jit
def row_major_tile(pid, cols, BLOCK_COLS: tl.constexpr):
    """(row tile, column tile) of program `pid` in row-major order: the column tiles of one row
    tile in a row (the split-K kernels: few row tiles, each read of W0 is a different column)."""
    num_pid_cols = tl.cdiv(cols, BLOCK_COLS)
    return pid // num_pid_cols, pid % num_pid_cols


@triton.jit
def tile_offsets(pid_rows, pid_cols, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """(row offsets, column offsets, row mask, column mask) of tile (pid_rows, pid_cols); int64
    offsets: row · stride can pass 2**31."""
    offs_rows = pid_rows.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_cols = pid_cols.to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return offs_rows, offs_cols, offs_rows < rows, offs_cols < cols
