/* TVM's parallel-for hook (TVMBackendParallelLaunch) on OpenMP: a TVM kernel library whose
 * launch pointer points here runs its T.parallel loops on the OpenMP team of the
 * calling thread, i.e. on torch's own worker threads (this library links libgomp.so.1, the one
 * torch has already loaded). Why: targets/tvm_parallel.py. */
#include <omp.h>
#include <stdint.h>

/* TVM's C ABI (tvm/runtime/c_backend_api.h) */
typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

static int snnc_threads = 0; /* 0: the OpenMP default of the calling thread */

void snnc_tvm_set_threads(int n) { snnc_threads = n; }

/* TVM splits the loop into penv->num_task chunks by task_id; every chunk must run exactly once.
 * Here the chunks are CHUNKS per thread, handed out dynamically: a thread the OS deschedules (a
 * loaded machine) leaves its chunks to the others instead of keeping them spinning at the end of
 * the region (libgomp spins there with `pause`, where TVM's pool yields). Valid because a library
 * with a barrier (the only thing that ties a chunk to a thread) is never hooked (tvm_parallel.py).
 * Inside a parallel region (nested) or with one thread the caller runs the whole loop as one
 * chunk, as TVM's own pool does. */
#define CHUNKS 4
int snnc_tvm_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int n = num_task > 0 ? num_task : (snnc_threads > 0 ? snnc_threads : omp_get_max_threads());
  int err = 0;
  if (n <= 1 || omp_in_parallel()) {
    TVMParallelGroupEnv env = {0, 1};
    return flambda(0, &env, cdata);
  }
  TVMParallelGroupEnv env = {0, n * CHUNKS};
#pragma omp parallel for num_threads(n) schedule(dynamic, 1)
  for (int task = 0; task < n * CHUNKS; task++) {
    int rc = flambda(task, &env, cdata);
    if (rc != 0) {
#pragma omp atomic write
      err = rc;
    }
  }
  return err;
}
