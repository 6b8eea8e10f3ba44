/* TVM's parallel-for hook (TVMBackendParallelLaunch / ParallelBarrier) on OpenMP: a TVM kernel
 * library whose function pointers point here runs its T.parallel loops on the OpenMP team of the
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

/* TVM splits the loop by penv->num_task and task_id, so every task of the team must run exactly
 * once: num_task is the team's actual size. Inside a parallel region (nested) or with one thread
 * the caller runs the whole loop as task 0 of 1, as TVM's own pool does. */
int snnc_tvm_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int n = num_task > 0 ? num_task : (snnc_threads > 0 ? snnc_threads : omp_get_max_threads());
  int err = 0;
  if (n <= 1 || omp_in_parallel()) {
    TVMParallelGroupEnv env = {0, 1};
    return flambda(0, &env, cdata);
  }
#pragma omp parallel num_threads(n)
  {
    TVMParallelGroupEnv env = {0, omp_get_num_threads()};
    int rc = flambda(omp_get_thread_num(), &env, cdata);
    if (rc != 0) {
#pragma omp atomic write
      err = rc;
    }
  }
  return err;
}

/* binds to the innermost enclosing parallel region (a no-op for a team of one) */
int snnc_tvm_parallel_barrier(int task_id, TVMParallelGroupEnv* penv) {
  (void)task_id;
  (void)penv;
#pragma omp barrier
  return 0;
}
