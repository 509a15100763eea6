// bf16 instantiations of the STDHA forward kernel (one file per dtype: parallel compile jobs).
#include "stdha_kernel.cuh"

namespace zeroi2v {
namespace stdha {
ZEROI2V_STDHA_FOR_EACH_CONFIG(ZEROI2V_STDHA_INSTANTIATE, true)
}  // namespace stdha
}  // namespace zeroi2v
