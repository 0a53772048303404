/* qora — the Vulkan backend (API and lifetimes: include/qora/vk_backend.h).

   Sections: loader and function table · instance and devices · context (device, queue,
   pipelines) · buffers · single kernels · weight packing · the model (plan, upload, the recorded
   steps, forward).

   The token step, as recorded (decode, one token; every line is one dispatch and each waits for
   the previous one with a memory barrier). Each product reads an input prepared once for it (Q8
   blocks for Q4/Q8 weights, see shaders/act.glsl), made by the end of the dispatch before it:
       embed, quant (+RMSNorm)            x = embedding row of the token; its normed Q8
       per layer:
         matvec QKV   (+RoPE)             q -> scratch; k, v -> KV cache at pos
         attention    (+Q8 of att)        att = softmax(q k^T / sqrt(d)) v, GQA
         matvec ADD   wo (+RMSNorm, Q8)   x += wo att
         matvec SWIGLU (+Q8 of hb)        hb = silu(gate x) * (up x)
         matvec ADD   w_down (+RMSNorm)   x += w_down hb; the next layer's (or final) norm
       matvec STORE LM head               logits
       copy logits to host-visible memory
   (Decode attention takes the query heads of one KV head per workgroup and splits a long context
   into chunks over many workgroups, the last to finish merging them (attn_decode.comp, or with
   QORA_VK_ATT_KERNEL=2 attn_decode2.comp: shorter chunks, merged in two levels); prefill
   attention is flash attention over tiles of queries and keys (attn_prefill.comp). The "+" steps
   run in the dispatch's last workgroup(s) to
   finish, counted with atomics: fewer dispatches, and no workgroup re-reads the whole input.)
   Prefill (n tokens) runs the same layers with batched products (matmul.comp) and separate
   norm / RoPE+KV kernels. Positions, token ids and the RoPE cos/sin table live in small
   host-visible buffers, so the decode command buffer is recorded once and only resubmitted. */

#define VK_NO_PROTOTYPES
#include "vulkan/vulkan_core.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qora/vk_backend.h"
#include "shaders_spv.h"

#ifdef _WIN32
#define WIN32_LEAN_AND_MEAN
#include <windows.h>
static void* qvk_open_lib(const char* name) { return (void*)LoadLibraryA(name); }
static void* qvk_sym(void* lib, const char* s) { return (void*)GetProcAddress((HMODULE)lib, s); }
static const char* const qvk_default_libs[] = {"vulkan-1.dll", NULL};
#else
#include <dlfcn.h>
static void* qvk_open_lib(const char* name) { return dlopen(name, RTLD_NOW | RTLD_LOCAL); }
static void* qvk_sym(void* lib, const char* s) { return dlsym(lib, s); }
#ifdef __APPLE__
/* the LunarG SDK / Homebrew loader (brew install vulkan-loader molten-vk), else MoltenVK itself (it exports
   vkGetInstanceProcAddr); dlopen's default search has neither Homebrew prefix on Apple silicon */
static const char* const qvk_default_libs[] = {"libvulkan.1.dylib", "libvulkan.dylib", "/usr/local/lib/libvulkan.1.dylib",
                                               "/opt/homebrew/lib/libvulkan.1.dylib", "libMoltenVK.dylib",
                                               "/usr/local/lib/libMoltenVK.dylib", "/opt/homebrew/lib/libMoltenVK.dylib",
                                               NULL};
#else
static const char* const qvk_default_libs[] = {"libvulkan.so.1", "libvulkan.so", NULL};
#endif
#endif

#define QVK_PORTABILITY_SUBSET "VK_KHR_portability_subset" /* in vulkan_beta.h, which we do not include */
/* VK_KHR_cooperative_matrix (Vulkan headers 1.3.255+; the vendored ones predate it) */
#define QVK_COOPMAT_EXT "VK_KHR_cooperative_matrix"
#define QVK_STYPE_COOPMAT_FEATURES ((VkStructureType)1000506000)
#define QVK_STYPE_COOPMAT_PROPERTIES ((VkStructureType)1000506001)
enum { QVK_COMPONENT_F16 = 0, QVK_COMPONENT_F32 = 1, QVK_SCOPE_SUBGROUP = 3 };
typedef struct {
    VkStructureType sType;
    void* pNext;
    VkBool32 cooperativeMatrix, cooperativeMatrixRobustBufferAccess;
} qvk_coopmat_features;
typedef struct {
    VkStructureType sType;
    void* pNext;
    uint32_t MSize, NSize, KSize;
    int32_t AType, BType, CType, ResultType; /* VkComponentTypeKHR */
    VkBool32 saturatingAccumulation;
    int32_t scope; /* VkScopeKHR */
} qvk_coopmat_props;
typedef VkResult(VKAPI_PTR* qvk_PFN_coopmat_props)(VkPhysicalDevice, uint32_t*, qvk_coopmat_props*);
/* matmul_coop.comp: 8 subgroups of 32, f16 16x16x16 -> f32, xs + ws (128 x 72 f16 each) + cs in shared memory */
#define QVK_COOP_SHARED (2u * 128u * 72u * 2u + 8u * 256u * 4u)
#define QVK_COOP_MIN_TILES 96u /* output tiles for a product to take the tensor cores (qvk_coop) */

#define QVK_FENCE_TIMEOUT_NS (120ull * 1000 * 1000 * 1000)
#define QVK_PUSH_BYTES 128
#define QVK_BINDINGS QVK_MAX_BINDINGS
#define QVK_PROFILE_MAX 1024 /* timestamps per decode step */
/* decode attention (attn_decode.comp): threads per workgroup, the default fewest positions per
   chunk (contexts up to it run in one pass, no partials and no merge), the most chunks per head
   group, and the workgroups the default chunk count aims at */
#define QVK_ATT_THREADS 128u
#define QVK_ATT_SHORT 256u
#define QVK_ATT_CH_MAX 256
#define QVK_ATT_WORKGROUPS 256
/* attn_decode2.comp: the same threads, fewest positions per chunk, the workgroups its default chunk
   count aims at (several per compute unit on a large GPU), partials per merge (its MB) */
#define QVK_ATT2_SHORT 32u
#define QVK_ATT2_WORKGROUPS 512
#define QVK_ATT2_MB 16u
/* the decode attention kernel by default (1 or 2) */
#define QVK_ATT_KERNEL 1

/* ================================================================ errors */

static int qvk_fail(char* err, size_t n, int code, const char* fmt, ...) {
    if (err && n) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, n, fmt, ap);
        va_end(ap);
    }
    return code;
}

static const char* qvk_result_name(VkResult r) {
    switch (r) {
    case VK_SUCCESS: return "VK_SUCCESS";
    case VK_TIMEOUT: return "VK_TIMEOUT";
    case VK_ERROR_OUT_OF_HOST_MEMORY: return "VK_ERROR_OUT_OF_HOST_MEMORY";
    case VK_ERROR_OUT_OF_DEVICE_MEMORY: return "VK_ERROR_OUT_OF_DEVICE_MEMORY";
    case VK_ERROR_INITIALIZATION_FAILED: return "VK_ERROR_INITIALIZATION_FAILED";
    case VK_ERROR_DEVICE_LOST: return "VK_ERROR_DEVICE_LOST";
    case VK_ERROR_MEMORY_MAP_FAILED: return "VK_ERROR_MEMORY_MAP_FAILED";
    case VK_ERROR_LAYER_NOT_PRESENT: return "VK_ERROR_LAYER_NOT_PRESENT";
    case VK_ERROR_EXTENSION_NOT_PRESENT: return "VK_ERROR_EXTENSION_NOT_PRESENT";
    case VK_ERROR_FEATURE_NOT_PRESENT: return "VK_ERROR_FEATURE_NOT_PRESENT";
    case VK_ERROR_INCOMPATIBLE_DRIVER: return "VK_ERROR_INCOMPATIBLE_DRIVER";
    case VK_ERROR_TOO_MANY_OBJECTS: return "VK_ERROR_TOO_MANY_OBJECTS";
    case VK_ERROR_OUT_OF_POOL_MEMORY: return "VK_ERROR_OUT_OF_POOL_MEMORY";
    default: return "VkResult error";
    }
}

static int qvk_code(VkResult r) {
    if (r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY) return QVK_ERR_OOM;
    if (r == VK_ERROR_DEVICE_LOST || r == VK_TIMEOUT) return QVK_ERR_DEVICE_LOST;
    return QVK_ERR_VK;
}

static int qvk_vkfail(char* err, size_t n, VkResult r, const char* what) {
    return qvk_fail(err, n, qvk_code(r), "%s failed: %s (%d)", what, qvk_result_name(r), (int)r);
}

/* ================================================================ function table */

#define QVK_INSTANCE_FNS(X)                                                                                 \
    X(vkDestroyInstance) X(vkEnumeratePhysicalDevices) X(vkGetPhysicalDeviceProperties)                     \
    X(vkGetPhysicalDeviceProperties2) X(vkGetPhysicalDeviceMemoryProperties)                                \
    X(vkGetPhysicalDeviceMemoryProperties2) X(vkGetPhysicalDeviceQueueFamilyProperties)                     \
    X(vkEnumerateDeviceExtensionProperties) X(vkCreateDevice) X(vkGetDeviceProcAddr)                     \
    X(vkGetPhysicalDeviceFeatures2)

#define QVK_DEVICE_FNS(X)                                                                                    \
    X(vkDestroyDevice) X(vkGetDeviceQueue) X(vkCreateBuffer) X(vkDestroyBuffer)                              \
    X(vkGetBufferMemoryRequirements) X(vkAllocateMemory) X(vkFreeMemory) X(vkBindBufferMemory) X(vkMapMemory) \
    X(vkUnmapMemory) X(vkCreateShaderModule) X(vkDestroyShaderModule) X(vkCreateDescriptorSetLayout)         \
    X(vkDestroyDescriptorSetLayout) X(vkCreatePipelineLayout) X(vkDestroyPipelineLayout)                     \
    X(vkCreateComputePipelines) X(vkDestroyPipeline) X(vkCreateDescriptorPool) X(vkDestroyDescriptorPool)    \
    X(vkAllocateDescriptorSets) X(vkUpdateDescriptorSets) X(vkCreateCommandPool) X(vkDestroyCommandPool)     \
    X(vkAllocateCommandBuffers) X(vkFreeCommandBuffers) X(vkBeginCommandBuffer) X(vkEndCommandBuffer)        \
    X(vkResetCommandBuffer) X(vkCmdBindPipeline) X(vkCmdBindDescriptorSets) X(vkCmdPushConstants)            \
    X(vkCmdDispatch) X(vkCmdDispatchIndirect) X(vkCmdPipelineBarrier) X(vkCmdCopyBuffer) X(vkCmdFillBuffer) X(vkQueueSubmit)          \
    X(vkCreateFence) X(vkDestroyFence) X(vkWaitForFences) X(vkResetFences) X(vkDeviceWaitIdle)             \
    X(vkCreateQueryPool) X(vkDestroyQueryPool) X(vkCmdResetQueryPool) X(vkCmdWriteTimestamp)                 \
    X(vkGetQueryPoolResults)

typedef struct {
    PFN_vkGetInstanceProcAddr vkGetInstanceProcAddr;
    PFN_vkCreateInstance vkCreateInstance;
    PFN_vkEnumerateInstanceVersion vkEnumerateInstanceVersion; /* NULL on a 1.0 loader */
    PFN_vkEnumerateInstanceExtensionProperties vkEnumerateInstanceExtensionProperties;
#define QVK_DECL(f) PFN_##f f;
    QVK_INSTANCE_FNS(QVK_DECL)
    QVK_DEVICE_FNS(QVK_DECL)
#undef QVK_DECL
} qvk_fns;

/* ================================================================ instance and devices */

typedef struct {
    qvk_fns f;
    VkInstance instance;
} qvk_inst;

static int qvk_has_ext(const VkExtensionProperties* e, uint32_t n, const char* name) {
    for (uint32_t i = 0; i < n; i++)
        if (!strcmp(e[i].extensionName, name)) return 1;
    return 0;
}

static int qvk_instance_open(const char* loader, qvk_inst* I, char* err, size_t n) {
    memset(I, 0, sizeof *I);
    void* lib = NULL;
    const char* tried = loader && *loader ? loader : qvk_default_libs[0];
    if (loader && *loader)
        lib = qvk_open_lib(loader);
    else
        for (int i = 0; qvk_default_libs[i] && !lib; i++) lib = qvk_open_lib(qvk_default_libs[i]);
    /* the library stays loaded: unloading drivers is fragile and the process may come back to it */
    if (!lib) return qvk_fail(err, n, QVK_ERR_LOADER, "no Vulkan loader (%s not found)", tried);
    qvk_fns* f = &I->f;
    f->vkGetInstanceProcAddr = (PFN_vkGetInstanceProcAddr)qvk_sym(lib, "vkGetInstanceProcAddr");
    if (!f->vkGetInstanceProcAddr) return qvk_fail(err, n, QVK_ERR_LOADER, "%s has no vkGetInstanceProcAddr", tried);
    f->vkCreateInstance = (PFN_vkCreateInstance)f->vkGetInstanceProcAddr(NULL, "vkCreateInstance");
    f->vkEnumerateInstanceVersion =
        (PFN_vkEnumerateInstanceVersion)f->vkGetInstanceProcAddr(NULL, "vkEnumerateInstanceVersion");
    f->vkEnumerateInstanceExtensionProperties = (PFN_vkEnumerateInstanceExtensionProperties)f->vkGetInstanceProcAddr(
        NULL, "vkEnumerateInstanceExtensionProperties");
    if (!f->vkCreateInstance || !f->vkEnumerateInstanceExtensionProperties)
        return qvk_fail(err, n, QVK_ERR_LOADER, "the Vulkan loader %s is incomplete", tried);
    uint32_t version = VK_API_VERSION_1_0;
    if (f->vkEnumerateInstanceVersion) f->vkEnumerateInstanceVersion(&version);
    if (version < VK_API_VERSION_1_1)
        return qvk_fail(err, n, QVK_ERR_FEATURE, "the Vulkan loader only offers Vulkan 1.0 (qora needs 1.1)");

    /* MoltenVK is listed only when the application opts into portability drivers */
    const char* exts[1];
    uint32_t n_exts = 0, n_avail = 0;
    VkInstanceCreateFlags flags = 0;
    f->vkEnumerateInstanceExtensionProperties(NULL, &n_avail, NULL);
    VkExtensionProperties* avail = calloc(n_avail + 1, sizeof *avail);
    if (!avail) return qvk_fail(err, n, QVK_ERR_OOM, "out of host memory");
    f->vkEnumerateInstanceExtensionProperties(NULL, &n_avail, avail);
    if (qvk_has_ext(avail, n_avail, VK_KHR_PORTABILITY_ENUMERATION_EXTENSION_NAME)) {
        exts[n_exts++] = VK_KHR_PORTABILITY_ENUMERATION_EXTENSION_NAME;
        flags |= VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR;
    }
    free(avail);

    VkApplicationInfo app = {VK_STRUCTURE_TYPE_APPLICATION_INFO, NULL, "qora", 1, "qora", 1, VK_API_VERSION_1_1};
    VkInstanceCreateInfo ci = {VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, NULL, flags, &app, 0, NULL, n_exts, exts};
    VkResult r = f->vkCreateInstance(&ci, NULL, &I->instance);
    if (r == VK_ERROR_INCOMPATIBLE_DRIVER)
        return qvk_fail(err, n, QVK_ERR_NO_DEVICE, "no Vulkan driver is installed (the loader found no ICD)");
    if (r != VK_SUCCESS) return qvk_vkfail(err, n, r, "vkCreateInstance");
#define QVK_LOAD_I(fn)                                                                    \
    f->fn = (PFN_##fn)f->vkGetInstanceProcAddr(I->instance, #fn);                         \
    if (!f->fn) {                                                                         \
        f->vkDestroyInstance = (PFN_vkDestroyInstance)f->vkGetInstanceProcAddr(I->instance, "vkDestroyInstance"); \
        if (f->vkDestroyInstance) f->vkDestroyInstance(I->instance, NULL);                \
        I->instance = VK_NULL_HANDLE;                                                     \
        return qvk_fail(err, n, QVK_ERR_LOADER, "the Vulkan loader lacks %s", #fn);      \
    }
    QVK_INSTANCE_FNS(QVK_LOAD_I)
#undef QVK_LOAD_I
    return QVK_OK;
}

static void qvk_instance_close(qvk_inst* I) {
    if (I->instance) I->f.vkDestroyInstance(I->instance, NULL);
    I->instance = VK_NULL_HANDLE;
}

static int qvk_compute_family(qvk_inst* I, VkPhysicalDevice pd, uint32_t* family) {
    uint32_t n = 0;
    I->f.vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, NULL);
    VkQueueFamilyProperties* q = calloc(n + 1, sizeof *q);
    if (!q) return 0;
    I->f.vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, q);
    int found = 0;
    for (uint32_t i = 0; i < n && !found; i++)
        if ((q[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && q[i].queueCount > 0) {
            *family = i;
            found = 1;
        }
    free(q);
    return found;
}

static int qvk_device_has_ext(qvk_inst* I, VkPhysicalDevice pd, const char* name) {
    uint32_t n = 0;
    I->f.vkEnumerateDeviceExtensionProperties(pd, NULL, &n, NULL);
    VkExtensionProperties* e = calloc(n + 1, sizeof *e);
    if (!e) return 0;
    I->f.vkEnumerateDeviceExtensionProperties(pd, NULL, &n, e);
    int has = qvk_has_ext(e, n, name);
    free(e);
    return has;
}

/* A diagnostic switch in the environment: set, not empty and not "0". */
static int qvk_env_flag(const char* name) {
    const char* v = getenv(name);
    return v && *v && strcmp(v, "0");
}

/* Whether the tensor-core prefill (matmul_coop.comp) can run: the device lists f16 x f16 -> f32
   16x16x16 subgroup matrices and offers the features the shader declares (Float16, the Vulkan
   memory model), with 32-wide subgroups (the shader's 8 per workgroup) and its shared memory. */
static int qvk_coopmat_probe(qvk_inst* I, VkPhysicalDevice pd, const VkPhysicalDeviceProperties* p, uint32_t sg) {
    if (p->apiVersion < VK_API_VERSION_1_1 || sg != 32 || p->limits.maxComputeSharedMemorySize < QVK_COOP_SHARED)
        return 0;
    if (!qvk_device_has_ext(I, pd, QVK_COOPMAT_EXT) ||
        !qvk_device_has_ext(I, pd, VK_KHR_SHADER_FLOAT16_INT8_EXTENSION_NAME) ||
        !qvk_device_has_ext(I, pd, VK_KHR_VULKAN_MEMORY_MODEL_EXTENSION_NAME))
        return 0;
    qvk_coopmat_features cf = {QVK_STYPE_COOPMAT_FEATURES};
    VkPhysicalDeviceVulkanMemoryModelFeatures mm = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES, &cf};
    VkPhysicalDeviceShaderFloat16Int8Features f16 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES, &mm};
    VkPhysicalDeviceFeatures2 f2 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, &f16};
    I->f.vkGetPhysicalDeviceFeatures2(pd, &f2);
    if (!cf.cooperativeMatrix || !f16.shaderFloat16 || !mm.vulkanMemoryModel) return 0;
    qvk_PFN_coopmat_props get = (qvk_PFN_coopmat_props)I->f.vkGetInstanceProcAddr(
        I->instance, "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR");
    uint32_t n = 0;
    if (!get || get(pd, &n, NULL) != VK_SUCCESS || n == 0 || n > 4096) return 0;
    qvk_coopmat_props* cp = calloc(n, sizeof *cp);
    if (!cp) return 0;
    for (uint32_t i = 0; i < n; i++) cp[i].sType = QVK_STYPE_COOPMAT_PROPERTIES;
    int ok = 0;
    const int dump = qvk_env_flag("QORA_VK_PIPELINE_STATS"); /* the shapes the driver lists (VkComponentTypeKHR codes) */
    if (get(pd, &n, cp) == VK_SUCCESS)
        for (uint32_t i = 0; i < n; i++) {
            if (dump)
                fprintf(stderr, "qora-vk %s coopmat %ux%ux%u A%d B%d C%d R%d sat%u scope%d\n", p->deviceName,
                        cp[i].MSize, cp[i].NSize, cp[i].KSize, cp[i].AType, cp[i].BType, cp[i].CType,
                        cp[i].ResultType, (unsigned)cp[i].saturatingAccumulation, cp[i].scope);
            ok = ok || (cp[i].MSize == 16 && cp[i].NSize == 16 && cp[i].KSize == 16 &&
                        cp[i].AType == QVK_COMPONENT_F16 && cp[i].BType == QVK_COMPONENT_F16 &&
                        cp[i].CType == QVK_COMPONENT_F32 && cp[i].ResultType == QVK_COMPONENT_F32 &&
                        cp[i].scope == QVK_SCOPE_SUBGROUP);
        }
    free(cp);
    return ok;
}

/* Everything qora needs to know about a device, and whether it can run on it. */
static void qvk_describe(qvk_inst* I, VkPhysicalDevice pd, qvk_device_info* d) {
    memset(d, 0, sizeof *d);
    VkPhysicalDeviceProperties p;
    I->f.vkGetPhysicalDeviceProperties(pd, &p);
    snprintf(d->name, sizeof d->name, "%s", p.deviceName);
    d->type = (int)p.deviceType;
    d->vendor_id = p.vendorID;
    d->device_id = p.deviceID;
    d->api_version = p.apiVersion;
    d->driver_version = p.driverVersion;
    d->max_storage_buffer_range = p.limits.maxStorageBufferRange;
    d->max_shared_memory = p.limits.maxComputeSharedMemorySize;

    VkPhysicalDeviceSubgroupProperties sg = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
    VkPhysicalDeviceMaintenance3Properties m3 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES, &sg};
    VkPhysicalDeviceShaderIntegerDotProductProperties dp = {
        VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_PROPERTIES, &m3};
    VkPhysicalDeviceShaderIntegerDotProductFeatures df = {
        VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_FEATURES};
    if (p.apiVersion >= VK_API_VERSION_1_1) {
        const int has_dot = qvk_device_has_ext(I, pd, VK_KHR_SHADER_INTEGER_DOT_PRODUCT_EXTENSION_NAME);
        VkPhysicalDeviceProperties2 p2 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, has_dot ? (void*)&dp : (void*)&m3};
        I->f.vkGetPhysicalDeviceProperties2(pd, &p2);
        d->subgroup_size = sg.subgroupSize;
        d->subgroup_shuffle = (sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) &&
                              (sg.supportedOperations & VK_SUBGROUP_FEATURE_SHUFFLE_BIT);
        d->max_allocation = m3.maxMemoryAllocationSize;
        if (has_dot) {
            VkPhysicalDeviceFeatures2 f2 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, &df};
            I->f.vkGetPhysicalDeviceFeatures2(pd, &f2);
            d->int_dot = df.shaderIntegerDotProduct ? 1 : 0;
            d->int_dot_fast = d->int_dot && dp.integerDotProduct4x8BitPackedSignedAccelerated;
        }
    }

    d->coopmat = qvk_coopmat_probe(I, pd, &p, sg.subgroupSize);

    VkPhysicalDeviceMemoryBudgetPropertiesEXT budget = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_BUDGET_PROPERTIES_EXT};
    int has_budget = p.apiVersion >= VK_API_VERSION_1_1 && qvk_device_has_ext(I, pd, VK_EXT_MEMORY_BUDGET_EXTENSION_NAME);
    VkPhysicalDeviceMemoryProperties2 mp2 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_PROPERTIES_2,
                                              has_budget ? &budget : NULL};
    if (p.apiVersion >= VK_API_VERSION_1_1)
        I->f.vkGetPhysicalDeviceMemoryProperties2(pd, &mp2);
    else
        I->f.vkGetPhysicalDeviceMemoryProperties(pd, &mp2.memoryProperties);
    const VkPhysicalDeviceMemoryProperties* mp = &mp2.memoryProperties;
    int heap = -1;
    for (uint32_t i = 0; i < mp->memoryHeapCount; i++)
        if ((mp->memoryHeaps[i].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT) &&
            (heap < 0 || mp->memoryHeaps[i].size > mp->memoryHeaps[heap].size))
            heap = (int)i;
    if (heap >= 0) {
        d->vram_bytes = mp->memoryHeaps[heap].size;
        d->vram_budget = has_budget && budget.heapBudget[heap] ? budget.heapBudget[heap] : d->vram_bytes;
    }

    uint32_t family;
    const VkSubgroupFeatureFlags need_ops = VK_SUBGROUP_FEATURE_BASIC_BIT | VK_SUBGROUP_FEATURE_ARITHMETIC_BIT;
    d->usable = 0;
    if (p.apiVersion < VK_API_VERSION_1_1)
        snprintf(d->why_not, sizeof d->why_not, "Vulkan %u.%u device (qora needs 1.1)", VK_API_VERSION_MAJOR(p.apiVersion),
                 VK_API_VERSION_MINOR(p.apiVersion));
    else if (!(sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) || (sg.supportedOperations & need_ops) != need_ops)
        snprintf(d->why_not, sizeof d->why_not, "no subgroup arithmetic in compute shaders");
    else if (!qvk_compute_family(I, pd, &family))
        snprintf(d->why_not, sizeof d->why_not, "no compute queue");
    else if (p.limits.maxComputeSharedMemorySize < 20480)
        snprintf(d->why_not, sizeof d->why_not, "only %u bytes of shared memory", p.limits.maxComputeSharedMemorySize);
    else if (p.limits.maxComputeWorkGroupInvocations < 256 || p.limits.maxPushConstantsSize < QVK_PUSH_BYTES ||
             p.limits.maxPerStageDescriptorStorageBuffers < QVK_BINDINGS)
        snprintf(d->why_not, sizeof d->why_not, "compute limits too small");
    else if (heap < 0)
        snprintf(d->why_not, sizeof d->why_not, "no device-local memory");
    else
        d->usable = 1;
}

int qvk_list_devices(const char* loader, qvk_device_info* out, int cap, int* count, char* err, size_t errlen) {
    qvk_inst I;
    *count = 0;
    int rc = qvk_instance_open(loader, &I, err, errlen);
    if (rc) return rc;
    uint32_t n = 0;
    VkResult r = I.f.vkEnumeratePhysicalDevices(I.instance, &n, NULL);
    VkPhysicalDevice* pds = calloc(n + 1, sizeof *pds);
    if (r == VK_SUCCESS && pds) r = I.f.vkEnumeratePhysicalDevices(I.instance, &n, pds);
    if (!pds || (r != VK_SUCCESS && r != VK_INCOMPLETE)) {
        free(pds);
        qvk_instance_close(&I);
        return pds ? qvk_vkfail(err, errlen, r, "vkEnumeratePhysicalDevices") : qvk_fail(err, errlen, QVK_ERR_OOM, "out of host memory");
    }
    for (uint32_t i = 0; i < n && (int)i < cap; i++) qvk_describe(&I, pds[i], &out[i]);
    *count = (int)n < cap ? (int)n : cap;
    free(pds);
    qvk_instance_close(&I);
    return QVK_OK;
}

/* ================================================================ context */

typedef struct {
    VkBuffer buf;
    VkDeviceMemory mem;
    VkDeviceSize size;
    void* map; /* host-visible buffers stay mapped */
} qvk_buffer;

typedef struct {
    int shader;
    int n_spec;
    uint32_t spec[8];
    VkPipeline pipe;
} qvk_pipe;

struct qvk_ctx {
    qvk_inst I;
    qvk_fns* f;
    VkPhysicalDevice pd;
    VkDevice dev;
    VkQueue queue;
    uint32_t family;
    qvk_device_info info;
    VkPhysicalDeviceMemoryProperties mem;
    VkPhysicalDeviceLimits limits;
    VkDescriptorSetLayout dsl;
    VkPipelineLayout layout;
    VkShaderModule modules[QVK_N_SHADERS];
    qvk_pipe* pipes;
    int n_pipes, cap_pipes;
    VkCommandPool cmd_pool;
    VkFence fence;
    qvk_buffer dummy; /* bound where a shader's binding is unused */
    int fail_alloc;
    int coop_subgroups; /* QORA_VK_COOP_SUBGROUPS: tensor-core pipelines require full subgroups (1), of 32 (2) */
    /* QORA_VK_PIPELINE_STATS=1: the driver's statistics of each pipeline (registers, spills, ...) on
       stderr, where it has VK_KHR_pipeline_executable_properties */
    PFN_vkGetPipelineExecutablePropertiesKHR exec_props;
    PFN_vkGetPipelineExecutableStatisticsKHR exec_stats;
};

enum { QVK_MEM_DEVICE, QVK_MEM_UPLOAD, QVK_MEM_READBACK, QVK_MEM_STAGING };

static int qvk_find_memory(const qvk_ctx* c, uint32_t bits, int kind) {
    VkMemoryPropertyFlags need, want, avoid;
    switch (kind) {
    case QVK_MEM_DEVICE:
        need = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, want = 0, avoid = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT;
        break;
    case QVK_MEM_UPLOAD: /* small per-step inputs: device-local host-visible (BAR) memory when there is one */
        need = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
        want = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, avoid = 0;
        break;
    case QVK_MEM_READBACK:
        need = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
        want = VK_MEMORY_PROPERTY_HOST_CACHED_BIT, avoid = 0;
        break;
    default: /* staging: plain system memory, leaving the small BAR heap alone */
        need = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
        want = 0, avoid = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT;
    }
    int best = -1, best_score = -1;
    for (uint32_t i = 0; i < c->mem.memoryTypeCount; i++) {
        VkMemoryPropertyFlags fl = c->mem.memoryTypes[i].propertyFlags;
        if (!(bits & (1u << i)) || (fl & need) != need) continue;
        int score = ((fl & want) == want && want ? 2 : 0) + ((fl & avoid) ? 0 : 1);
        if (score > best_score) best = (int)i, best_score = score;
    }
    return best;
}

static void qvk_buffer_free(qvk_ctx* c, qvk_buffer* b) {
    if (b->map) c->f->vkUnmapMemory(c->dev, b->mem);
    if (b->buf) c->f->vkDestroyBuffer(c->dev, b->buf, NULL);
    if (b->mem) c->f->vkFreeMemory(c->dev, b->mem, NULL);
    memset(b, 0, sizeof *b);
}

/* One buffer with its own allocation (a few hundred per model, well under any driver limit). */
static int qvk_buffer_new(qvk_ctx* c, VkDeviceSize size, int kind, qvk_buffer* b, char* err, size_t n) {
    memset(b, 0, sizeof *b);
    size = (size + 15) & ~(VkDeviceSize)15;
    if (size == 0) size = 16;
    if (kind == QVK_MEM_DEVICE && c->fail_alloc)
        return qvk_fail(err, n, QVK_ERR_OOM, "device memory allocation failed (simulated by QORA_VK_FAIL=alloc)");
    VkBufferCreateInfo bi = {VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
    bi.size = size;
    bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT |
               VK_BUFFER_USAGE_INDIRECT_BUFFER_BIT;
    bi.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
    VkResult r = c->f->vkCreateBuffer(c->dev, &bi, NULL, &b->buf);
    if (r != VK_SUCCESS) return qvk_vkfail(err, n, r, "vkCreateBuffer");
    VkMemoryRequirements req;
    c->f->vkGetBufferMemoryRequirements(c->dev, b->buf, &req);
    int type = qvk_find_memory(c, req.memoryTypeBits, kind);
    if (type < 0) {
        qvk_buffer_free(c, b);
        return qvk_fail(err, n, QVK_ERR_FEATURE, "no suitable memory type");
    }
    VkMemoryAllocateInfo ai = {VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, NULL, req.size, (uint32_t)type};
    r = c->f->vkAllocateMemory(c->dev, &ai, NULL, &b->mem);
    if (r != VK_SUCCESS) {
        qvk_buffer_free(c, b);
        return qvk_fail(err, n, qvk_code(r), "allocating %.1f MB of %s memory failed: %s", (double)size / 1e6,
                        kind == QVK_MEM_DEVICE ? "device" : "host-visible", qvk_result_name(r));
    }
    r = c->f->vkBindBufferMemory(c->dev, b->buf, b->mem, 0);
    if (r == VK_SUCCESS && kind != QVK_MEM_DEVICE) r = c->f->vkMapMemory(c->dev, b->mem, 0, VK_WHOLE_SIZE, 0, &b->map);
    if (r != VK_SUCCESS) {
        qvk_buffer_free(c, b);
        return qvk_vkfail(err, n, r, "binding buffer memory");
    }
    b->size = size;
    return QVK_OK;
}

static int qvk_submit_wait(qvk_ctx* c, VkCommandBuffer cb, char* err, size_t n) {
    VkSubmitInfo si = {VK_STRUCTURE_TYPE_SUBMIT_INFO};
    si.commandBufferCount = 1;
    si.pCommandBuffers = &cb;
    VkResult r = c->f->vkQueueSubmit(c->queue, 1, &si, c->fence);
    if (r != VK_SUCCESS) return qvk_vkfail(err, n, r, "vkQueueSubmit");
    r = c->f->vkWaitForFences(c->dev, 1, &c->fence, VK_TRUE, QVK_FENCE_TIMEOUT_NS);
    if (r != VK_SUCCESS) return qvk_vkfail(err, n, r, "waiting for the GPU");
    r = c->f->vkResetFences(c->dev, 1, &c->fence);
    if (r != VK_SUCCESS) return qvk_vkfail(err, n, r, "vkResetFences");
    return QVK_OK;
}

static VkCommandBuffer qvk_cmd_new(qvk_ctx* c) {
    VkCommandBufferAllocateInfo ai = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, NULL, c->cmd_pool,
                                      VK_COMMAND_BUFFER_LEVEL_PRIMARY, 1};
    VkCommandBuffer cb = VK_NULL_HANDLE;
    if (c->f->vkAllocateCommandBuffers(c->dev, &ai, &cb) != VK_SUCCESS) return VK_NULL_HANDLE;
    return cb;
}

static VkResult qvk_cmd_begin(qvk_ctx* c, VkCommandBuffer cb, int once) {
    c->f->vkResetCommandBuffer(cb, 0);
    VkCommandBufferBeginInfo bi = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
    bi.flags = once ? VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT : 0;
    return c->f->vkBeginCommandBuffer(cb, &bi);
}

static void qvk_barrier(qvk_ctx* c, VkCommandBuffer cb, VkPipelineStageFlags src, VkAccessFlags sa,
                        VkPipelineStageFlags dst, VkAccessFlags da) {
    VkMemoryBarrier mb = {VK_STRUCTURE_TYPE_MEMORY_BARRIER, NULL, sa, da};
    c->f->vkCmdPipelineBarrier(cb, src, dst, 0, 1, &mb, 0, NULL, 0, NULL);
}

static void qvk_compute_barrier(qvk_ctx* c, VkCommandBuffer cb) {
    qvk_barrier(c, cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT,
                VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT);
}

static int qvk_shader_index(const char* name) {
    for (int i = 0; i < QVK_N_SHADERS; i++)
        if (!strcmp(qvk_shaders[i].name, name)) return i;
    return -1;
}

static void qvk_print_pipeline_stats(qvk_ctx* c, VkPipeline pipe, const char* name, const uint32_t* spec, int n_spec) {
    VkPipelineInfoKHR pinfo = {VK_STRUCTURE_TYPE_PIPELINE_INFO_KHR, NULL, pipe};
    VkPipelineExecutablePropertiesKHR props[4];
    uint32_t n_ex = 4;
    for (uint32_t i = 0; i < 4; i++) props[i] = (VkPipelineExecutablePropertiesKHR){VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_PROPERTIES_KHR};
    if (c->exec_props(c->dev, &pinfo, &n_ex, props) < 0) return;
    fprintf(stderr, "qora-vk pipeline %s spec", name);
    for (int i = 0; i < n_spec; i++) fprintf(stderr, " %u", spec[i]);
    fprintf(stderr, ":");
    for (uint32_t e = 0; e < n_ex; e++) {
        VkPipelineExecutableInfoKHR ei = {VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_INFO_KHR, NULL, pipe, e};
        VkPipelineExecutableStatisticKHR st[32];
        uint32_t n_st = 32;
        for (uint32_t i = 0; i < 32; i++) st[i] = (VkPipelineExecutableStatisticKHR){VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_STATISTIC_KHR};
        if (c->exec_stats(c->dev, &ei, &n_st, st) < 0) continue;
        for (uint32_t i = 0; i < n_st; i++) {
            fprintf(stderr, " [%s=", st[i].name);
            switch (st[i].format) {
            case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_BOOL32_KHR: fprintf(stderr, "%u", (unsigned)st[i].value.b32); break;
            case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_INT64_KHR: fprintf(stderr, "%lld", (long long)st[i].value.i64); break;
            case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_UINT64_KHR: fprintf(stderr, "%llu", (unsigned long long)st[i].value.u64); break;
            default: fprintf(stderr, "%g", st[i].value.f64);
            }
            fprintf(stderr, "]");
        }
    }
    fprintf(stderr, "\n");
}

/* The pipeline of a shader specialized with spec[0..n_spec) (constant ids 0..n_spec-1), cached. */
static VkPipeline qvk_pipeline(qvk_ctx* c, const char* name, const uint32_t* spec, int n_spec, char* err, size_t n) {
    static const uint32_t no_spec[1] = {0};
    if (!spec) spec = no_spec, n_spec = 0; /* memcmp/memcpy want a pointer even for 0 bytes */
    int s = qvk_shader_index(name);
    if (s < 0 || n_spec < 0 || n_spec > 8) {
        qvk_fail(err, n, QVK_ERR_ARGS, "unknown shader %s", name);
        return VK_NULL_HANDLE;
    }
    for (int i = 0; i < c->n_pipes; i++) {
        qvk_pipe* p = &c->pipes[i];
        if (p->shader == s && p->n_spec == n_spec && !memcmp(p->spec, spec, (size_t)n_spec * 4)) return p->pipe;
    }
    VkResult r;
    if (!c->modules[s]) {
        VkShaderModuleCreateInfo mi = {VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO, NULL, 0, qvk_shaders[s].size,
                                       qvk_shaders[s].code};
        r = c->f->vkCreateShaderModule(c->dev, &mi, NULL, &c->modules[s]);
        if (r != VK_SUCCESS) {
            qvk_vkfail(err, n, r, "vkCreateShaderModule");
            return VK_NULL_HANDLE;
        }
    }
    VkSpecializationMapEntry entries[8];
    for (int i = 0; i < n_spec; i++) entries[i] = (VkSpecializationMapEntry){(uint32_t)i, (uint32_t)i * 4, 4};
    VkSpecializationInfo si = {(uint32_t)n_spec, entries, (size_t)n_spec * 4, spec};
    VkComputePipelineCreateInfo pi = {VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO};
    pi.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
    pi.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
    pi.stage.module = c->modules[s];
    pi.stage.pName = "main";
    pi.stage.pSpecializationInfo = n_spec ? &si : NULL;
    pi.layout = c->layout;
    if (c->exec_stats) pi.flags |= VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR;
    VkPipelineShaderStageRequiredSubgroupSizeCreateInfo rss = {
        VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_REQUIRED_SUBGROUP_SIZE_CREATE_INFO, NULL, 32};
    if (c->coop_subgroups && !strncmp(name, "matmul_coop", 11)) {
        pi.stage.flags |= VK_PIPELINE_SHADER_STAGE_CREATE_REQUIRE_FULL_SUBGROUPS_BIT;
        if (c->coop_subgroups == 2) pi.stage.pNext = &rss;
    }
    VkPipeline pipe = VK_NULL_HANDLE;
    r = c->f->vkCreateComputePipelines(c->dev, VK_NULL_HANDLE, 1, &pi, NULL, &pipe);
    if (r != VK_SUCCESS) {
        qvk_vkfail(err, n, r, "vkCreateComputePipelines");
        return VK_NULL_HANDLE;
    }
    if (c->exec_stats) qvk_print_pipeline_stats(c, pipe, name, spec, n_spec);
    if (c->n_pipes == c->cap_pipes) {
        int cap = c->cap_pipes ? 2 * c->cap_pipes : 32;
        qvk_pipe* np = realloc(c->pipes, (size_t)cap * sizeof *np);
        if (!np) {
            c->f->vkDestroyPipeline(c->dev, pipe, NULL);
            qvk_fail(err, n, QVK_ERR_OOM, "out of host memory");
            return VK_NULL_HANDLE;
        }
        c->pipes = np, c->cap_pipes = cap;
    }
    qvk_pipe* p = &c->pipes[c->n_pipes++];
    memset(p, 0, sizeof *p);
    p->shader = s, p->n_spec = n_spec, p->pipe = pipe;
    memcpy(p->spec, spec, (size_t)n_spec * 4);
    return pipe;
}

void qvk_ctx_destroy(qvk_ctx* c) {
    if (!c) return;
    if (c->dev) {
        c->f->vkDeviceWaitIdle(c->dev);
        for (int i = 0; i < c->n_pipes; i++) c->f->vkDestroyPipeline(c->dev, c->pipes[i].pipe, NULL);
        for (int i = 0; i < QVK_N_SHADERS; i++)
            if (c->modules[i]) c->f->vkDestroyShaderModule(c->dev, c->modules[i], NULL);
        qvk_buffer_free(c, &c->dummy);
        if (c->layout) c->f->vkDestroyPipelineLayout(c->dev, c->layout, NULL);
        if (c->dsl) c->f->vkDestroyDescriptorSetLayout(c->dev, c->dsl, NULL);
        if (c->fence) c->f->vkDestroyFence(c->dev, c->fence, NULL);
        if (c->cmd_pool) c->f->vkDestroyCommandPool(c->dev, c->cmd_pool, NULL);
        c->f->vkDestroyDevice(c->dev, NULL);
    }
    qvk_instance_close(&c->I);
    free(c->pipes);
    free(c);
}

int qvk_ctx_create(const char* loader, int device_index, qvk_ctx** out, char* err, size_t n) {
    *out = NULL;
    qvk_ctx* c = calloc(1, sizeof *c);
    if (!c) return qvk_fail(err, n, QVK_ERR_OOM, "out of host memory");
    c->f = &c->I.f;
    int rc = qvk_instance_open(loader, &c->I, err, n);
    if (rc) {
        free(c);
        return rc;
    }
    uint32_t count = 0;
    VkResult r = c->f->vkEnumeratePhysicalDevices(c->I.instance, &count, NULL);
    VkPhysicalDevice* pds = calloc(count + 1, sizeof *pds);
    if (r == VK_SUCCESS && pds) r = c->f->vkEnumeratePhysicalDevices(c->I.instance, &count, pds);
    if (r != VK_SUCCESS || !pds || device_index < 0 || (uint32_t)device_index >= count) {
        free(pds);
        qvk_ctx_destroy(c);
        if (count == 0) return qvk_fail(err, n, QVK_ERR_NO_DEVICE, "no Vulkan device");
        return qvk_fail(err, n, QVK_ERR_NO_DEVICE, "no Vulkan device %d (there are %u)", device_index, count);
    }
    c->pd = pds[device_index];
    free(pds);
    qvk_describe(&c->I, c->pd, &c->info);
    if (!c->info.usable) {
        rc = qvk_fail(err, n, QVK_ERR_FEATURE, "%s: %s", c->info.name, c->info.why_not);
        qvk_ctx_destroy(c);
        return rc;
    }
    VkPhysicalDeviceProperties props;
    c->f->vkGetPhysicalDeviceProperties(c->pd, &props);
    c->limits = props.limits;
    c->f->vkGetPhysicalDeviceMemoryProperties(c->pd, &c->mem);
    qvk_compute_family(&c->I, c->pd, &c->family);

    const char* exts[10];
    uint32_t n_exts = 0;
    if (qvk_device_has_ext(&c->I, c->pd, VK_EXT_MEMORY_BUDGET_EXTENSION_NAME))
        exts[n_exts++] = VK_EXT_MEMORY_BUDGET_EXTENSION_NAME;
    if (qvk_device_has_ext(&c->I, c->pd, QVK_PORTABILITY_SUBSET)) exts[n_exts++] = QVK_PORTABILITY_SUBSET;
    /* packed integer dot products for the decode Q4/Q8 products, where offered */
    VkPhysicalDeviceShaderIntegerDotProductFeatures dot = {
        VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_FEATURES, NULL, VK_TRUE};
    if (c->info.int_dot) exts[n_exts++] = VK_KHR_SHADER_INTEGER_DOT_PRODUCT_EXTENSION_NAME;
    /* tensor-core prefill, where the device has it (qvk_coopmat_probe) */
    qvk_coopmat_features cf = {QVK_STYPE_COOPMAT_FEATURES, NULL, VK_TRUE, VK_FALSE};
    VkPhysicalDeviceVulkanMemoryModelFeatures mm = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES, &cf,
                                                    VK_TRUE, VK_FALSE, VK_FALSE};
    VkPhysicalDeviceShaderFloat16Int8Features f16 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES,
                                                     &mm, VK_TRUE, VK_FALSE};
    void* chain = NULL;
    if (c->info.coopmat) {
        exts[n_exts++] = QVK_COOPMAT_EXT;
        exts[n_exts++] = VK_KHR_SHADER_FLOAT16_INT8_EXTENSION_NAME;
        exts[n_exts++] = VK_KHR_VULKAN_MEMORY_MODEL_EXTENSION_NAME;
        chain = &f16;
    }
    if (c->info.int_dot) {
        dot.pNext = chain;
        chain = &dot;
    }
    VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR pe = {
        VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR, NULL, VK_TRUE};
    int stats = qvk_env_flag("QORA_VK_PIPELINE_STATS") &&
                qvk_device_has_ext(&c->I, c->pd, VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME);
    if (stats) {
        exts[n_exts++] = VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME;
        pe.pNext = chain;
        chain = &pe;
    }
    VkPhysicalDeviceSubgroupSizeControlFeatures ssc = {
        VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_FEATURES, NULL, VK_TRUE, VK_TRUE};
    const char* csg = getenv("QORA_VK_COOP_SUBGROUPS"); /* a measurement knob (bench/coopmat_probe.sh) */
    if (c->info.coopmat && csg && (!strcmp(csg, "1") || !strcmp(csg, "2")) &&
        qvk_device_has_ext(&c->I, c->pd, VK_EXT_SUBGROUP_SIZE_CONTROL_EXTENSION_NAME)) {
        exts[n_exts++] = VK_EXT_SUBGROUP_SIZE_CONTROL_EXTENSION_NAME;
        ssc.pNext = chain;
        chain = &ssc;
        c->coop_subgroups = atoi(csg);
    }
    float prio = 1.0f;
    VkDeviceQueueCreateInfo qi = {VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO, NULL, 0, c->family, 1, &prio};
    VkDeviceCreateInfo di = {VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
    di.pNext = chain;
    di.queueCreateInfoCount = 1;
    di.pQueueCreateInfos = &qi;
    di.enabledExtensionCount = n_exts;
    di.ppEnabledExtensionNames = exts;
    r = c->f->vkCreateDevice(c->pd, &di, NULL, &c->dev);
    if (r != VK_SUCCESS) {
        c->dev = VK_NULL_HANDLE;
        rc = qvk_vkfail(err, n, r, "vkCreateDevice");
        qvk_ctx_destroy(c);
        return rc;
    }
#define QVK_LOAD_D(fn) c->f->fn = (PFN_##fn)c->f->vkGetDeviceProcAddr(c->dev, #fn);
    QVK_DEVICE_FNS(QVK_LOAD_D)
#undef QVK_LOAD_D
#define QVK_CHECK_D(fn)                                                                \
    if (!c->f->fn) {                                                                   \
        rc = qvk_fail(err, n, QVK_ERR_LOADER, "the Vulkan driver lacks %s", #fn);     \
        if (c->f->vkDestroyDevice) c->f->vkDestroyDevice(c->dev, NULL);                \
        c->dev = VK_NULL_HANDLE;                                                       \
        qvk_ctx_destroy(c);                                                            \
        return rc;                                                                     \
    }
    QVK_DEVICE_FNS(QVK_CHECK_D)
#undef QVK_CHECK_D
    c->f->vkGetDeviceQueue(c->dev, c->family, 0, &c->queue);
    if (stats) {
        c->exec_props = (PFN_vkGetPipelineExecutablePropertiesKHR)c->f->vkGetDeviceProcAddr(
            c->dev, "vkGetPipelineExecutablePropertiesKHR");
        c->exec_stats = (PFN_vkGetPipelineExecutableStatisticsKHR)c->f->vkGetDeviceProcAddr(
            c->dev, "vkGetPipelineExecutableStatisticsKHR");
        if (!c->exec_props || !c->exec_stats) c->exec_props = NULL, c->exec_stats = NULL;
    }

    VkDescriptorSetLayoutBinding b[QVK_BINDINGS];
    for (int i = 0; i < QVK_BINDINGS; i++)
        b[i] = (VkDescriptorSetLayoutBinding){(uint32_t)i, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 1,
                                              VK_SHADER_STAGE_COMPUTE_BIT, NULL};
    VkDescriptorSetLayoutCreateInfo li = {VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO, NULL, 0, QVK_BINDINGS, b};
    VkPushConstantRange pcr = {VK_SHADER_STAGE_COMPUTE_BIT, 0, QVK_PUSH_BYTES};
    VkCommandPoolCreateInfo cpi = {VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO, NULL,
                                   VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, c->family};
    VkFenceCreateInfo fi = {VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    r = c->f->vkCreateDescriptorSetLayout(c->dev, &li, NULL, &c->dsl);
    if (r == VK_SUCCESS) {
        VkPipelineLayoutCreateInfo pli = {VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO, NULL, 0, 1, &c->dsl, 1, &pcr};
        r = c->f->vkCreatePipelineLayout(c->dev, &pli, NULL, &c->layout);
    }
    if (r == VK_SUCCESS) r = c->f->vkCreateCommandPool(c->dev, &cpi, NULL, &c->cmd_pool);
    if (r == VK_SUCCESS) r = c->f->vkCreateFence(c->dev, &fi, NULL, &c->fence);
    if (r != VK_SUCCESS) {
        rc = qvk_vkfail(err, n, r, "creating the compute context");
        qvk_ctx_destroy(c);
        return rc;
    }
    rc = qvk_buffer_new(c, 256, QVK_MEM_DEVICE, &c->dummy, err, n);
    if (rc) {
        qvk_ctx_destroy(c);
        return rc;
    }
    *out = c;
    return QVK_OK;
}

const qvk_device_info* qvk_ctx_info(const qvk_ctx* c) { return &c->info; }
void qvk_ctx_set_fail_alloc(qvk_ctx* c, int fail) { c->fail_alloc = fail; }

/* ================================================================ descriptor sets */

typedef struct {
    VkBuffer b[QVK_BINDINGS];
    VkDescriptorSet set;
} qvk_set_entry;

typedef struct {
    VkDescriptorPool* pools;
    int n_pools;
    uint32_t pool_sets;
    qvk_set_entry* sets;
    int n_sets, cap_sets;
} qvk_sets;

static void qvk_sets_free(qvk_ctx* c, qvk_sets* s) {
    for (int i = 0; i < s->n_pools; i++) c->f->vkDestroyDescriptorPool(c->dev, s->pools[i], NULL);
    free(s->pools);
    free(s->sets);
    memset(s, 0, sizeof *s);
}

static int qvk_pool_add(qvk_ctx* c, qvk_sets* s, char* err, size_t n) {
    VkDescriptorPoolSize ps = {VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, s->pool_sets * QVK_BINDINGS};
    VkDescriptorPoolCreateInfo pi = {VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO, NULL, 0, s->pool_sets, 1, &ps};
    VkDescriptorPool* np = realloc(s->pools, (size_t)(s->n_pools + 1) * sizeof *np);
    if (!np) return qvk_fail(err, n, QVK_ERR_OOM, "out of host memory");
    s->pools = np;
    VkResult r = c->f->vkCreateDescriptorPool(c->dev, &pi, NULL, &s->pools[s->n_pools]);
    if (r != VK_SUCCESS) return qvk_vkfail(err, n, r, "vkCreateDescriptorPool");
    s->n_pools++;
    return QVK_OK;
}

/* The descriptor set binding b[0..8) (VK_NULL_HANDLE: the dummy buffer); made once, then reused. */
static VkDescriptorSet qvk_set(qvk_ctx* c, qvk_sets* s, const VkBuffer* b, char* err, size_t n) {
    VkBuffer key[QVK_BINDINGS];
    for (int i = 0; i < QVK_BINDINGS; i++) key[i] = b[i] ? b[i] : c->dummy.buf;
    for (int i = 0; i < s->n_sets; i++)
        if (!memcmp(s->sets[i].b, key, sizeof key)) return s->sets[i].set;
    if (s->n_sets == s->cap_sets) {
        int cap = s->cap_sets ? 2 * s->cap_sets : 256;
        qvk_set_entry* ns = realloc(s->sets, (size_t)cap * sizeof *ns);
        if (!ns) {
            qvk_fail(err, n, QVK_ERR_OOM, "out of host memory");
            return VK_NULL_HANDLE;
        }
        s->sets = ns, s->cap_sets = cap;
    }
    VkDescriptorSet set = VK_NULL_HANDLE;
    VkResult r = VK_ERROR_OUT_OF_POOL_MEMORY;
    if (s->n_pools) {
        VkDescriptorSetAllocateInfo ai = {VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO, NULL,
                                          s->pools[s->n_pools - 1], 1, &c->dsl};
        r = c->f->vkAllocateDescriptorSets(c->dev, &ai, &set);
    }
    if (r == VK_ERROR_OUT_OF_POOL_MEMORY || r == VK_ERROR_FRAGMENTED_POOL) {
        if (qvk_pool_add(c, s, err, n)) return VK_NULL_HANDLE;
        VkDescriptorSetAllocateInfo ai = {VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO, NULL,
                                          s->pools[s->n_pools - 1], 1, &c->dsl};
        r = c->f->vkAllocateDescriptorSets(c->dev, &ai, &set);
    }
    if (r != VK_SUCCESS) {
        qvk_vkfail(err, n, r, "vkAllocateDescriptorSets");
        return VK_NULL_HANDLE;
    }
    VkDescriptorBufferInfo bi[QVK_BINDINGS];
    VkWriteDescriptorSet w[QVK_BINDINGS];
    for (int i = 0; i < QVK_BINDINGS; i++) {
        bi[i] = (VkDescriptorBufferInfo){key[i], 0, VK_WHOLE_SIZE};
        w[i] = (VkWriteDescriptorSet){VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET};
        w[i].dstSet = set;
        w[i].dstBinding = (uint32_t)i;
        w[i].descriptorCount = 1;
        w[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        w[i].pBufferInfo = &bi[i];
    }
    c->f->vkUpdateDescriptorSets(c->dev, QVK_BINDINGS, w, 0, NULL);
    memcpy(s->sets[s->n_sets].b, key, sizeof key);
    s->sets[s->n_sets++].set = set;
    return set;
}

/* Record one dispatch. Groups beyond the 65535 limit of one dimension spill into y; the
   shaders that can get that many (matvec) fold y back into a linear index. */
/* indirect: the workgroup counts are read from that buffer when the command runs (gx, gy, gz unused) */
static int qvk_dispatch(qvk_ctx* c, qvk_sets* s, VkCommandBuffer cb, VkPipeline pipe, const VkBuffer* binds,
                        const void* push, size_t push_bytes, uint32_t gx, uint32_t gy, uint32_t gz,
                        VkBuffer indirect, char* err, size_t n) {
    VkDescriptorSet set = qvk_set(c, s, binds, err, n);
    if (!set) return QVK_ERR_VK;
    c->f->vkCmdBindPipeline(cb, VK_PIPELINE_BIND_POINT_COMPUTE, pipe);
    c->f->vkCmdBindDescriptorSets(cb, VK_PIPELINE_BIND_POINT_COMPUTE, c->layout, 0, 1, &set, 0, NULL);
    if (push_bytes) c->f->vkCmdPushConstants(cb, c->layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, (uint32_t)push_bytes, push);
    if (indirect) {
        c->f->vkCmdDispatchIndirect(cb, indirect, 0);
        return QVK_OK;
    }
    uint32_t maxg = c->limits.maxComputeWorkGroupCount[0];
    if (gy == 1 && gz == 1 && gx > maxg) {
        gy = (gx + maxg - 1) / maxg;
        gx = maxg;
    }
    c->f->vkCmdDispatch(cb, gx, gy, gz);
    return QVK_OK;
}

/* ================================================================ single kernels */

int qvk_run_kernel(qvk_ctx* c, const char* name, const uint32_t* spec, int n_spec, const qvk_hostbuf* bufs,
                   const void* push, size_t push_bytes, uint32_t gx, uint32_t gy, uint32_t gz, char* err,
                   size_t errlen) {
    if (push_bytes > QVK_PUSH_BYTES || gx == 0 || gy == 0 || gz == 0)
        return qvk_fail(err, errlen, QVK_ERR_ARGS, "bad kernel launch arguments");
    VkPipeline pipe = qvk_pipeline(c, name, spec, n_spec, err, errlen);
    if (!pipe) return QVK_ERR_ARGS;
    qvk_buffer b[QVK_BINDINGS];
    VkBuffer vb[QVK_BINDINGS];
    memset(b, 0, sizeof b);
    qvk_sets sets = {0};
    sets.pool_sets = 4;
    VkCommandBuffer cb = VK_NULL_HANDLE;
    int rc = QVK_OK;
    for (int i = 0; i < QVK_BINDINGS && !rc; i++) {
        vb[i] = VK_NULL_HANDLE;
        if (!bufs[i].data) continue;
        rc = qvk_buffer_new(c, bufs[i].bytes, QVK_MEM_READBACK, &b[i], err, errlen);
        if (!rc) {
            memcpy(b[i].map, bufs[i].data, bufs[i].bytes);
            vb[i] = b[i].buf;
        }
    }
    if (!rc) {
        cb = qvk_cmd_new(c);
        if (!cb) rc = qvk_fail(err, errlen, QVK_ERR_VK, "vkAllocateCommandBuffers failed");
    }
    if (!rc && qvk_cmd_begin(c, cb, 1) != VK_SUCCESS) rc = qvk_fail(err, errlen, QVK_ERR_VK, "vkBeginCommandBuffer failed");
    if (!rc) {
        rc = qvk_dispatch(c, &sets, cb, pipe, vb, push, push_bytes, gx, gy, gz, VK_NULL_HANDLE, err, errlen);
        qvk_barrier(c, cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT, VK_PIPELINE_STAGE_HOST_BIT,
                    VK_ACCESS_HOST_READ_BIT);
        if (c->f->vkEndCommandBuffer(cb) != VK_SUCCESS && !rc)
            rc = qvk_fail(err, errlen, QVK_ERR_VK, "vkEndCommandBuffer failed");
    }
    if (!rc) rc = qvk_submit_wait(c, cb, err, errlen);
    for (int i = 0; i < QVK_BINDINGS; i++) {
        if (!rc && b[i].map) memcpy(bufs[i].data, b[i].map, bufs[i].bytes);
        qvk_buffer_free(c, &b[i]);
    }
    if (cb) c->f->vkFreeCommandBuffers(c->dev, c->cmd_pool, 1, &cb);
    qvk_sets_free(c, &sets);
    return rc;
}

/* ================================================================ weight packing */

/* Bytes of one stored row in the file, and of a packed matrix of `rows` rows on the device. */
static size_t qvk_file_row_bytes(int dtype, int cols) { return qora_row_bytes(dtype, cols); }

/* enum qora_dtype -> the name qora/dtypes.py gives it, which also names the shaders (matvec_q4, embed_f16, ...) */
static const char* const qvk_dtype_names[] = {"f32", "f16", "q8", "q4", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k",
                                              "bf16"};
#define QVK_N_DTYPES ((int)(sizeof qvk_dtype_names / sizeof *qvk_dtype_names))
static const char* qvk_dtype_name(int d) { return d >= 0 && d < QVK_N_DTYPES ? qvk_dtype_names[d] : "?"; }

/* The device layout of a block type (shaders/dequant.glsl): each block split into its main part
   (quants; a multiple of 16 bytes, so every shader load is an aligned uvec4) and its meta part
   (scales, Q5 high bits) in a region after all the main parts. Returns 0 for the plain float types. */
typedef struct {
    int elems, main, meta; /* elements, main bytes, meta bytes of one block */
} qvk_layout_t;

static int qvk_layout(int dtype, qvk_layout_t* L) {
    switch (dtype) {
    case QORA_Q4: *L = (qvk_layout_t){QK, 16, 2}; return 1;
    case QORA_Q8: *L = (qvk_layout_t){QK, 32, 2}; return 1;
    case QORA_Q4_1: *L = (qvk_layout_t){QK, 16, 4}; return 1;
    case QORA_Q5_0:
    case QORA_Q5_1: *L = (qvk_layout_t){QK, 16, 8}; return 1;
    case QORA_Q4_K: *L = (qvk_layout_t){QK_K, 144, 0}; return 1;
    case QORA_Q5_K: *L = (qvk_layout_t){QK_K, 176, 0}; return 1;
    case QORA_Q6_K: *L = (qvk_layout_t){QK_K, 208, 4}; return 1;
    default: return 0;
    }
}

/* One file block split into its device parts (meta bytes beyond the stored ones are zero). */
static void qvk_split_block(int dtype, const uint8_t* b, uint8_t* main, uint8_t* meta) {
    switch (dtype) {
    case QORA_Q4: memcpy(main, b + 2, 16), memcpy(meta, b, 2); break;
    case QORA_Q8: memcpy(main, b + 2, 32), memcpy(meta, b, 2); break;
    case QORA_Q4_1: memcpy(main, b + 4, 16), memcpy(meta, b, 4); break; /* d, m */
    case QORA_Q5_0: memcpy(main, b + 6, 16), memcpy(meta, b + 2, 4), memcpy(meta + 4, b, 2), memset(meta + 6, 0, 2); break;
    case QORA_Q5_1: memcpy(main, b + 8, 16), memcpy(meta, b + 4, 4), memcpy(meta + 4, b, 4); break; /* qh; d, m */
    case QORA_Q4_K: memcpy(main, b, 144); break;
    case QORA_Q5_K: memcpy(main, b, 176); break;
    default: memcpy(main, b, 208), memcpy(meta, b + 208, 2), memset(meta + 2, 0, 2); break; /* Q6_K: d last */
    }
}

static size_t qvk_quant_bytes(int dtype, int rows, int cols) { /* the main region (all of a float type's) */
    qvk_layout_t L;
    if (!qvk_layout(dtype, &L)) return (size_t)rows * qvk_file_row_bytes(dtype, cols);
    return (size_t)rows * (size_t)(cols / L.elems) * (size_t)L.main;
}

static size_t qvk_meta_bytes(int dtype, int rows, int cols) {
    qvk_layout_t L;
    return qvk_layout(dtype, &L) ? (size_t)rows * (size_t)(cols / L.elems) * (size_t)L.meta : 0;
}

size_t qvk_packed_bytes(int dtype, int rows, int cols) {
    const size_t b = qvk_quant_bytes(dtype, rows, cols) + qvk_meta_bytes(dtype, rows, cols);
    return (b + 15) & ~(size_t)15;
}

/* Rows [a, a+k) of a matrix with `rows` rows in all, from row-major file blocks `src` (row a first):
   main parts to q (row a's first), meta parts to sc. */
static void qvk_pack_rows(int dtype, int cols, int k, const uint8_t* src, uint8_t* q, uint8_t* sc) {
    const size_t rb = qvk_file_row_bytes(dtype, cols);
    qvk_layout_t L;
    if (!qvk_layout(dtype, &L)) {
        memcpy(q, src, (size_t)k * rb);
        return;
    }
    const int nb = cols / L.elems;
    const size_t bb = rb / (size_t)nb;
    for (int r = 0; r < k; r++)
        for (int i = 0; i < nb; i++) {
            const size_t j = (size_t)r * nb + i;
            qvk_split_block(dtype, src + (size_t)r * rb + (size_t)i * bb, q + j * L.main, sc + j * L.meta);
        }
}

static int qvk_shape_ok(int dtype, int cols) {
    qvk_layout_t L;
    if (qvk_layout(dtype, &L)) return cols > 0 && cols % L.elems == 0;
    switch (dtype) {
    case QORA_F16:
    case QORA_BF16: return cols > 0 && cols % 8 == 0;
    case QORA_F32: return cols > 0 && cols % 4 == 0;
    default: return 0;
    }
}

int qvk_pack(int dtype, int rows, int cols, const void* src, void* dst) {
    if (rows <= 0 || !qvk_shape_ok(dtype, cols)) return QVK_ERR_ARGS;
    uint8_t* d = dst;
    memset(d, 0, qvk_packed_bytes(dtype, rows, cols));
    qvk_pack_rows(dtype, cols, rows, src, d, d + qvk_quant_bytes(dtype, rows, cols));
    return QVK_OK;
}

/* ================================================================ the model */

typedef struct {
    qvk_buffer buf;
    int r0, rows;
} qvk_chunk;

typedef struct {
    int dtype, rows, cols;
    int row0; /* its first row's place in a product split by type (q|k|v): output column / QKV row */
    int n_chunks;
    qvk_chunk* chunks;
} qvk_matrix;

typedef struct {
    qvk_matrix wqkv[3]; /* (q_dim + 2 kv_dim, dim): wq, wk, wv stacked, in n_qkv pieces of one type each */
    int n_qkv;
    qvk_matrix wo;     /* (dim, q_dim) */
    qvk_matrix wgu[2]; /* (2 hidden, dim): gate, then up; one matrix, or gate and up when their types differ */
    int n_gu;
    qvk_matrix wdown;  /* (dim, hidden) */
    qvk_buffer attn_norm, ffn_norm; /* (dim,) f32 */
    qvk_buffer kc, vc; /* max_seq_len rows of kv_dim values of kv_type (qvk_kv_row_bytes) */
    qvk_buffer kb, vb; /* batched steps: n_slots x slot_rows rows, slot s from row s x slot_rows */
    VkBuffer *kslot, *vslot; /* slot s's rows of kb, vb as buffers of their own (aliases: the one-row step) */
    int use_rope;
} qvk_layer;

struct qvk_model {
    qvk_ctx* c;
    qora_config cfg;
    int q_dim, kv_dim, qkv_dim, widest;
    int batch, logit_rows;
    int mv_threads, mv_rows;
    qvk_layer* layers;
    qvk_matrix embed, output_own; /* output_own unused when the LM head is the embedding (tied) */
    qvk_matrix* output;
    qvk_buffer norm;
    /* scratch, shapes per prefill batch */
    qvk_buffer x;      /* (batch, dim) residual stream */
    qvk_buffer xn;     /* (batch, widest) a product's prepared input (Q8: integer values); decode: hb */
    qvk_buffer xs;     /* (batch, widest/32) Q8 block scales of xn */
    qvk_buffer qkv;    /* (batch, qkv_dim) */
    qvk_buffer att;    /* (batch, q_dim) */
    qvk_buffer gu;     /* (batch, 2 hidden) */
    qvk_buffer logits; /* (logit_rows, vocab) */
    qvk_buffer att_args; /* decode attention's indirect dispatch: (head groups, chunks in use, 1), per step */
    qvk_buffer att_part, att_done; /* decode attention partials and counts (qvk_alloc_scratch: per kernel) */
    int att_ch;         /* decode: chunks per head group at most */
    uint32_t att_short; /* decode: fewest positions per chunk (one pass up to this many) */
    uint32_t att_hg;    /* query heads per attention workgroup (all of one KV head) */
    int att_kernel;     /* decode: 1 attn_decode.comp, 2 attn_decode2.comp */
    uint32_t att_c;     /* attn_decode2: threads per cluster (one cached position at a time) */
    uint32_t att_t;     /* attn_decode2: threads per workgroup */
    int gu_rows;
    /* decode inputs, prepared once per product (act.glsl): two halves, each act_w floats, act_w/4
       words of Q8 ints and act_w/32 (scale, sum) pairs; the producers alternate between them */
    qvk_buffer act, cnt; /* cnt: the counters of the "last workgroup finishes up" epilogues */
    uint32_t act_w, act_half;
    int int_dot; /* decode Q4/Q8 products use the packed integer dot product shaders */
    int f32_act; /* Q4/Q8 products with float activations too (the "f32" precision), not Q8 ones */
    int coopmat; /* prefill products on cooperative matrices (matmul_coop.comp): 0 never, 1 where they pay, 2 always */
    uint32_t coop_min_tiles; /* where they pay: products of at least this many 128 x 128 tiles */
    char coop_shader[32]; /* QORA_VK_COOP_SHADER: a measurement variant for the Q4 products (gen_shaders --probes) */
    /* decode profile (opts.profile): a timestamp after every dispatch of the step */
    VkQueryPool qpool;
    int n_ts;
    const char* ts_label[QVK_PROFILE_MAX];
    qvk_profile_entry prof[64];
    int n_prof;
    double prof_step_ns, ts_period;
    long prof_steps;
    double prof_pp_ns; /* prefill: GPU time of the profiled prefill submissions, their count */
    long prof_pp_runs;
    qvk_buffer readback, params, rope; /* host-visible: logits, [start, n, -, -, tokens...], cos/sin */
    float* inv_freq;
    qvk_sets sets;
    VkCommandBuffer cb_decode, cb_prefill;
    int decode_recorded;
    int kv_type; /* QORA_F32, QORA_F16, QORA_Q8 */
    int chunk_rows; /* tests: split the embedding / LM head into chunks of this many rows */
    int fail_after;
    long n_forward;
    int lost;
    /* sampling where the logits are (sample_topk.comp): the decode step recorded a second time with the
       candidates' search and copy instead of the logits' copy; the logits stay on the device, copied
       back only when asked for (cb_copy) */
    qvk_buffer sample_in, sample_out; /* [need, n_gather, ids...] (host-visible); the shader's output */
    VkCommandBuffer cb_decode_topk, cb_copy;
    int topk_recorded, copy_recorded;
    /* batched steps over several sequences (qvk_model_open_batch): per layer the slots' caches (kb, vb),
       the rows' cache rows (rowmap: slot x slot_ctx + position), the entries (seg: start, n, first row,
       first cache row), each entry's last row gathered (xg) for the LM head (blogits, bread) */
    int n_slots, slot_ctx, b_ents;
    int slot_rows; /* rows between slots: slot_ctx padded so each slot starts on a 256-byte boundary */
    qvk_buffer rowmap, seg, xg, blogits, bread;
    /* a step of one decode row runs the decode step (mat-vecs, split-K attention) over that slot's
       aliases: a command buffer per slot, recorded on first use */
    int slot_decode, use_slot_decode;
    VkCommandBuffer* cb_slot;
    int* slot_recorded;
    uint32_t b_n_ent, b_max_n; /* the pass being recorded: entries, the longest */
};

#define QVK_DEFAULT_BATCH 512
#define QVK_DEFAULT_LOGIT_ROWS 32

typedef struct {
    size_t bytes; /* device-local bytes */
    int batch, logit_rows;
} qvk_plan_t;

static int qvk_chunk_rows(const qvk_ctx* c, int dtype, int rows, int cols) {
    /* the most rows whose packed matrix fits one storage-buffer binding (packing pads by < 32 bytes) */
    const size_t per_row = qvk_quant_bytes(dtype, 1, cols) + qvk_meta_bytes(dtype, 1, cols);
    const size_t limit = c->info.max_storage_buffer_range;
    const size_t k = limit > 32 && per_row ? (limit - 32) / per_row : 0;
    return k >= (size_t)rows ? rows : (int)k;
}

static int qvk_matrix_dtype_ok(const qora_tensor* t, int rows, int cols) {
    return t->data && t->rows == rows && t->cols == cols && qvk_shape_ok(t->dtype, cols);
}

/* q, k, v in runs of one type (llama-quantize's mixes store v in more bits than q and k): the pieces
   of the fused QKV product, each its own matrix and dispatch. Piece i holds tensors first[i] ..
   first[i] + count[i] - 1 of (q, k, v), rows[i] rows from row row0[i] of the stacked product. */
typedef struct {
    int n, dtype[3], row0[3], rows[3], first[3], count[3];
} qvk_qkv_split;

static void qvk_split_qkv(const qora_layer* S, int q_dim, int kv_dim, qvk_qkv_split* P) {
    const qora_tensor* t[3] = {&S->wq, &S->wk, &S->wv};
    const int rows[3] = {q_dim, kv_dim, kv_dim};
    memset(P, 0, sizeof *P);
    for (int i = 0, r0 = 0; i < 3; r0 += rows[i], i++) {
        if (i == 0 || t[i]->dtype != t[i - 1]->dtype) {
            P->dtype[P->n] = t[i]->dtype, P->row0[P->n] = r0, P->first[P->n] = i;
            P->n++;
        }
        P->rows[P->n - 1] += rows[i];
        P->count[P->n - 1]++;
    }
}

/* Why a layer's weights cannot run here (NULL if they can). */
static const char* qvk_layer_problem(const qora_layer* L, int D, int H, int q_dim, int kv_dim, char* buf, size_t n) {
    const qora_tensor* t[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
    static const char* const names[7] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    const int rows[7] = {q_dim, kv_dim, kv_dim, D, H, H, D}, cols[7] = {D, D, D, q_dim, D, D, H};
    if (!L->attn_norm || !L->ffn_norm) return "a norm weight is missing";
    for (int i = 0; i < 7; i++)
        if (!qvk_matrix_dtype_ok(t[i], rows[i], cols[i])) {
            snprintf(buf, n, "%s: type %s with %d columns is not supported on the GPU", names[i],
                     qvk_dtype_name(t[i]->dtype), t[i]->cols);
            return buf;
        }
    return NULL;
}

/* Bytes of one cached position's keys (or values) in one layer: f32, f16, or Q8_0 rows as
   kvq8.glsl lays them out (the int8 values, then the f16 scales, padded to 16 bytes). */
static size_t qvk_kv_row_bytes(int kv_type, int kv_dim) {
    if (kv_type == QORA_Q8) return (((size_t)kv_dim / 4 + ((size_t)kv_dim / QK + 1) / 2 + 3) & ~(size_t)3) * 4;
    return (size_t)kv_dim * (kv_type == QORA_F16 ? 2 : 4);
}

/* Check the model can run here and add up the device memory it takes. */
static int qvk_plan(const qvk_ctx* c, const qora_config* g, const qora_weights* w, const qvk_model_opts* o,
                    qvk_plan_t* p, char* err, size_t n) {
    memset(p, 0, sizeof *p);
    const int D = g->dim, H = g->hidden_dim, V = g->vocab_size;
    if (g->n_layers < 1 || D < 1 || H < 1 || V < 1 || g->n_heads < 1 || g->n_kv_heads < 1 || g->head_dim < 1 ||
        g->n_heads % g->n_kv_heads || !w || !w->layers || !w->norm || !w->inv_freq || !o || o->max_seq_len < 1)
        return qvk_fail(err, n, QVK_ERR_ARGS, "inconsistent model config");
    const int q_dim = g->n_heads * g->head_dim, kv_dim = g->n_kv_heads * g->head_dim;
    if (g->head_dim % 8 || g->head_dim > 256 || D % 8 || q_dim % 8 || H % 8)
        return qvk_fail(err, n, QVK_ERR_UNSUPPORTED, "head size %d / dim %d / hidden %d not supported on the GPU",
                        g->head_dim, D, H);
    const size_t range = c->info.max_storage_buffer_range;
    size_t bytes = 0;
    const qora_tensor* emb = &w->tok_embeddings;
    const qora_tensor* out = &w->output;
    if (!qvk_matrix_dtype_ok(emb, V, D) || !qvk_matrix_dtype_ok(out, V, D))
        return qvk_fail(err, n, QVK_ERR_UNSUPPORTED, "embedding/LM head type %s with %d columns not supported",
                        qvk_dtype_name(emb->dtype), D);
    if (qvk_chunk_rows(c, emb->dtype, V, D) < 1 || qvk_chunk_rows(c, out->dtype, V, D) < 1)
        return qvk_fail(err, n, QVK_ERR_UNSUPPORTED, "an embedding row does not fit a storage buffer");
    bytes += qvk_packed_bytes(emb->dtype, V, D) + 4096;
    if (out->data != emb->data) bytes += qvk_packed_bytes(out->dtype, V, D) + 4096;
    for (int l = 0; l < g->n_layers; l++) {
        const qora_layer* L = &w->layers[l];
        char why[160];
        const char* problem = qvk_layer_problem(L, D, H, q_dim, kv_dim, why, sizeof why);
        if (problem) return qvk_fail(err, n, QVK_ERR_UNSUPPORTED, "layer %d: %s", l, problem);
        qvk_qkv_split qs;
        qvk_split_qkv(L, q_dim, kv_dim, &qs);
        size_t parts[7] = {qvk_packed_bytes(L->wo.dtype, D, q_dim), qvk_packed_bytes(L->w_gate.dtype, H, D),
                           qvk_packed_bytes(L->w_up.dtype, H, D), qvk_packed_bytes(L->w_down.dtype, D, H), 0, 0, 0};
        if (L->w_gate.dtype == L->w_up.dtype) parts[1] = qvk_packed_bytes(L->w_gate.dtype, 2 * H, D), parts[2] = 0;
        for (int i = 0; i < qs.n; i++) parts[4 + i] = qvk_packed_bytes(qs.dtype[i], qs.rows[i], D);
        for (int i = 0; i < 4 + qs.n; i++) {
            if (parts[i] > range)
                return qvk_fail(err, n, QVK_ERR_UNSUPPORTED, "layer %d: a %.0f MB matrix exceeds the device's %.0f MB "
                                "storage-buffer limit", l, (double)parts[i] / 1e6, (double)range / 1e6);
            bytes += parts[i] + 256;
        }
        bytes += 2 * ((size_t)D * 4 + 256);
    }
    if (!qora_kv_type_ok(o->kv_type, g->head_dim))
        return qvk_fail(err, n, QVK_ERR_UNSUPPORTED, "KV cache type %d with head size %d not supported on the GPU",
                        o->kv_type, g->head_dim);
    const size_t kv_layer = (size_t)o->max_seq_len * qvk_kv_row_bytes(o->kv_type, kv_dim);
    if (kv_layer > range)
        return qvk_fail(err, n, QVK_ERR_UNSUPPORTED, "a %d-token KV cache layer (%.0f MB) exceeds the device's "
                        "storage-buffer limit", o->max_seq_len, (double)kv_layer / 1e6);
    bytes += 2 * (size_t)g->n_layers * (kv_layer + 256);
    int widest = D > q_dim ? D : q_dim;
    if (H > widest) widest = H;
    int batch = o->batch > 0 ? o->batch : QVK_DEFAULT_BATCH;
    size_t row_max = 2 * (size_t)H; /* the widest scratch row: each scratch buffer must fit one binding */
    if ((size_t)(q_dim + 2 * kv_dim) > row_max) row_max = (size_t)(q_dim + 2 * kv_dim);
    if ((size_t)widest > row_max) row_max = (size_t)widest;
    while (batch > 1 && (size_t)batch * row_max * 4 > range) batch /= 2;
    int logit_rows = o->logit_rows > 0 ? o->logit_rows : QVK_DEFAULT_LOGIT_ROWS;
    if (logit_rows > batch) logit_rows = batch;
    while (logit_rows > 1 && (size_t)logit_rows * (size_t)V * 4 > range) logit_rows /= 2;
    if ((size_t)V * 4 > range) return qvk_fail(err, n, QVK_ERR_UNSUPPORTED, "the logits exceed a storage buffer");
    bytes += (size_t)batch * 4 * ((size_t)D + (size_t)widest + (size_t)widest / 32 + 1 + (size_t)(q_dim + 2 * kv_dim) + (size_t)q_dim + 2 * (size_t)H);
    bytes += (size_t)logit_rows * (size_t)V * 4 + 8 * 256 + (size_t)D * 4;
    /* decode attention partials and counters, either kernel (attn_decode2: block partials and counts too) */
    bytes += (size_t)g->n_heads * (QVK_ATT_CH_MAX + QVK_ATT2_MB) * ((size_t)g->head_dim + 16) * 4 +
             (size_t)g->n_heads * (1 + QVK_ATT2_MB) * 4;
    bytes += 2 * (((size_t)widest + 127) & ~(size_t)127) * 4 * 2 + (size_t)widest / 8 + 512; /* act (bound), cnt */
    p->bytes = bytes;
    p->batch = batch;
    p->logit_rows = logit_rows;
    return QVK_OK;
}

int qvk_model_estimate(const qvk_ctx* c, const qora_config* cfg, const qora_weights* w, const qvk_model_opts* o,
                       uint64_t* bytes, char* err, size_t errlen) {
    qvk_plan_t p;
    int rc = qvk_plan(c, cfg, w, o, &p, err, errlen);
    *bytes = rc ? 0 : (uint64_t)p.bytes;
    return rc;
}

static void qvk_matrix_free(qvk_ctx* c, qvk_matrix* M) {
    for (int i = 0; i < M->n_chunks; i++) qvk_buffer_free(c, &M->chunks[i].buf);
    free(M->chunks);
    memset(M, 0, sizeof *M);
}

static void qvk_batch_free(qvk_model* m);

void qvk_model_destroy(qvk_model* m) {
    if (!m) return;
    qvk_ctx* c = m->c;
    if (c->dev) c->f->vkDeviceWaitIdle(c->dev);
    if (m->layers)
        for (int l = 0; l < m->cfg.n_layers; l++) {
            qvk_layer* L = &m->layers[l];
            for (int i = 0; i < 3; i++) qvk_matrix_free(c, &L->wqkv[i]);
            qvk_matrix_free(c, &L->wo);
            for (int i = 0; i < 2; i++) qvk_matrix_free(c, &L->wgu[i]);
            qvk_matrix_free(c, &L->wdown);
            qvk_buffer_free(c, &L->attn_norm);
            qvk_buffer_free(c, &L->ffn_norm);
            qvk_buffer_free(c, &L->kc);
            qvk_buffer_free(c, &L->vc);
        }
    qvk_batch_free(m);
    free(m->layers);
    qvk_matrix_free(c, &m->embed);
    qvk_matrix_free(c, &m->output_own);
    if (m->qpool) c->f->vkDestroyQueryPool(c->dev, m->qpool, NULL);
    qvk_buffer* bufs[] = {&m->act, &m->cnt, &m->att_args, &m->att_part, &m->att_done, &m->norm, &m->x, &m->xn, &m->xs, &m->qkv, &m->att, &m->gu, &m->logits, &m->readback, &m->params,
                          &m->rope, &m->sample_in, &m->sample_out};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) qvk_buffer_free(c, bufs[i]);
    VkCommandBuffer cbs[4] = {m->cb_decode, m->cb_prefill, m->cb_decode_topk, m->cb_copy};
    for (int i = 0; i < 4; i++)
        if (cbs[i]) c->f->vkFreeCommandBuffers(c->dev, c->cmd_pool, 1, &cbs[i]);
    qvk_sets_free(c, &m->sets);
    free(m->inv_freq);
    free(m);
}

/* Allocate a matrix's device buffers: one per chunk of rows that fits a storage-buffer binding
   (only the embedding / LM head ever needs more than one). */
static int qvk_matrix_alloc(qvk_model* m, qvk_matrix* M, int dtype, int rows, int cols, int max_rows, char* err,
                            size_t n) {
    M->dtype = dtype, M->rows = rows, M->cols = cols;
    int per = qvk_chunk_rows(m->c, dtype, rows, cols);
    if (max_rows > 0 && per > max_rows) per = max_rows;
    M->n_chunks = (rows + per - 1) / per;
    M->chunks = calloc((size_t)M->n_chunks, sizeof *M->chunks);
    if (!M->chunks) return qvk_fail(err, n, QVK_ERR_OOM, "out of host memory");
    for (int i = 0; i < M->n_chunks; i++) {
        qvk_chunk* ch = &M->chunks[i];
        ch->r0 = i * per;
        ch->rows = rows - ch->r0 < per ? rows - ch->r0 : per;
        int rc = qvk_buffer_new(m->c, qvk_packed_bytes(dtype, ch->rows, cols), QVK_MEM_DEVICE, &ch->buf, err, n);
        if (rc) return rc;
    }
    return QVK_OK;
}

/* Consecutive rows of a matrix taken from one or more file tensors (q, k, v stacked; gate, up). */
typedef struct {
    const uint8_t* src;
    int rows;
} qvk_part;

static const uint8_t* qvk_part_row(const qvk_part* parts, int n_parts, size_t row_bytes, int row) {
    for (int i = 0; i < n_parts; i++) {
        if (row < parts[i].rows) return parts[i].src + (size_t)row * row_bytes;
        row -= parts[i].rows;
    }
    return NULL;
}

/* Pack a matrix into the staging buffer piece by piece and copy each piece into place. */
static int qvk_upload_matrix(qvk_model* m, qvk_matrix* M, const qvk_part* parts, int n_parts, qvk_buffer* stage,
                             VkCommandBuffer cb, char* err, size_t n) {
    qvk_ctx* c = m->c;
    const size_t frb = qvk_file_row_bytes(M->dtype, M->cols);
    const size_t qrow = qvk_quant_bytes(M->dtype, 1, M->cols); /* main bytes per row */
    const size_t srow = qvk_meta_bytes(M->dtype, 1, M->cols);  /* meta bytes per row */
    const int quant = srow > 0;
    const int stage_rows = (int)(stage->size / (qrow + srow + 16));
    if (stage_rows < 1) return qvk_fail(err, n, QVK_ERR_ARGS, "staging buffer too small");
    for (int ci = 0; ci < M->n_chunks; ci++) {
        qvk_chunk* ch = &M->chunks[ci];
        for (int a = 0; a < ch->rows; a += stage_rows) {
            const int k = ch->rows - a < stage_rows ? ch->rows - a : stage_rows;
            uint8_t* q = stage->map;
            uint8_t* sc = q + (((size_t)k * qrow + 15) & ~(size_t)15);
            /* rows of one source part are contiguous: pack them in runs */
            for (int r = 0; r < k;) {
                int g = ch->r0 + a + r, run = 0, left = g;
                for (int i = 0; i < n_parts; i++) {
                    if (left < parts[i].rows) {
                        run = parts[i].rows - left;
                        break;
                    }
                    left -= parts[i].rows;
                }
                if (run > k - r) run = k - r;
                const uint8_t* src = qvk_part_row(parts, n_parts, frb, g);
                if (!src || run < 1) return qvk_fail(err, n, QVK_ERR_ARGS, "weight rows out of range");
                qvk_pack_rows(M->dtype, M->cols, run, src, q + (size_t)r * qrow, sc + (size_t)r * srow);
                r += run;
            }
            VkBufferCopy regions[2];
            uint32_t nr = 0;
            regions[nr++] = (VkBufferCopy){0, (VkDeviceSize)a * qrow, (VkDeviceSize)k * qrow};
            if (quant)
                regions[nr++] = (VkBufferCopy){(VkDeviceSize)(sc - q),
                                               (VkDeviceSize)qvk_quant_bytes(M->dtype, ch->rows, M->cols) + (VkDeviceSize)a * srow,
                                               (VkDeviceSize)k * srow};
            if (qvk_cmd_begin(c, cb, 1) != VK_SUCCESS) return qvk_fail(err, n, QVK_ERR_VK, "vkBeginCommandBuffer failed");
            c->f->vkCmdCopyBuffer(cb, stage->buf, ch->buf.buf, nr, regions);
            if (c->f->vkEndCommandBuffer(cb) != VK_SUCCESS) return qvk_fail(err, n, QVK_ERR_VK, "vkEndCommandBuffer failed");
            int rc = qvk_submit_wait(c, cb, err, n);
            if (rc) return rc;
        }
    }
    return QVK_OK;
}

static int qvk_upload_f32(qvk_model* m, qvk_buffer* dst, const float* src, size_t count, qvk_buffer* stage,
                          VkCommandBuffer cb, char* err, size_t n) {
    qvk_ctx* c = m->c;
    if (count * 4 > stage->size) return qvk_fail(err, n, QVK_ERR_ARGS, "staging buffer too small");
    memcpy(stage->map, src, count * 4);
    VkBufferCopy region = {0, 0, count * 4};
    if (qvk_cmd_begin(c, cb, 1) != VK_SUCCESS) return qvk_fail(err, n, QVK_ERR_VK, "vkBeginCommandBuffer failed");
    c->f->vkCmdCopyBuffer(cb, stage->buf, dst->buf, 1, &region);
    if (c->f->vkEndCommandBuffer(cb) != VK_SUCCESS) return qvk_fail(err, n, QVK_ERR_VK, "vkEndCommandBuffer failed");
    return qvk_submit_wait(c, cb, err, n);
}

/* The model's sizes and tuning: the config, the plan's batch, the options clamped to what the shaders take. */
/* attn_decode2.comp's cluster size for head_dim hd: enough lanes for one 8-element unit each, a power
   of two, at most the subgroup; 0 where the device or the shape cannot take that kernel (no subgroup
   shuffles, more than 4 units a lane, its shared arrays too big). */
static uint32_t qvk_att2_cluster(const qvk_model* m) {
    const qvk_device_info* d = &m->c->info;
    const uint32_t hd = (uint32_t)m->cfg.head_dim, nu = hd / 8u, t = m->att_t;
    uint32_t cl = 1;
    while (cl < nu) cl *= 2;
    if (cl > d->subgroup_size) cl = d->subgroup_size;
    if (!d->subgroup_shuffle || cl == 0 || t % cl || (nu + cl - 1) / cl > 4) return 0;
    const uint32_t nc = t / cl, hg = m->att_hg;
    if (4u * (nc * hd + 2u * nc * hg + 3u * hg * QVK_ATT2_MB + 2u * hg + 64u) + 64u > d->max_shared_memory) return 0;
    return cl;
}

/* Attention shapes: HG query heads of one KV head per workgroup (the largest divisor of the group
   size up to 8), so K/V are loaded once per KV head; decode chunks of at least att_short positions,
   at most att_ch per head group (about QVK_ATT_WORKGROUPS workgroups on a long context, or
   QVK_ATT2_WORKGROUPS with attn_decode2's shorter chunks). */
static void qvk_attention_settings(qvk_model* m, const qvk_model_opts* o) {
    const qora_config* cfg = &m->cfg;
    const int group = cfg->n_heads / cfg->n_kv_heads;
    m->att_hg = 1;
    for (int d = 8; d >= 1; d--)
        if (group % d == 0) {
            m->att_hg = (uint32_t)d;
            break;
        }
    m->att_t = QVK_ATT_THREADS; /* attn_decode2's workgroup: a power of two, 32..256 */
    if (o->att_threads > 0) {
        m->att_t = 32;
        while (m->att_t < 256 && m->att_t * 2 <= (uint32_t)o->att_threads) m->att_t *= 2;
    }
    m->att_c = qvk_att2_cluster(m);
    m->att_kernel = (o->att_kernel > 0 ? o->att_kernel : QVK_ATT_KERNEL) == 2 && m->att_c ? 2 : 1;
    const int k2 = m->att_kernel == 2;
    m->att_short = o->att_short < 0 ? (k2 ? QVK_ATT2_SHORT : QVK_ATT_SHORT) : (uint32_t)o->att_short;
    if (k2 && m->att_short < 1) m->att_short = 1;
    const int groups = cfg->n_heads / (int)m->att_hg;
    m->att_ch = o->att_splits > 0 ? o->att_splits : (k2 ? QVK_ATT2_WORKGROUPS : QVK_ATT_WORKGROUPS) / groups;
    if (m->att_ch < 1) m->att_ch = 1;
    if (m->att_ch > QVK_ATT_CH_MAX) m->att_ch = QVK_ATT_CH_MAX; /* attn_decode2: MB x MB at most */
    if (k2) return;
    /* attn_decode's shared arrays (q, scores, subgroup partials, value sums, merge weights) must fit */
    const uint32_t hd = (uint32_t)cfg->head_dim, hg = m->att_hg, t = QVK_ATT_THREADS;
    while (m->att_ch > 1 && 4u * (hg * hd + 2u * hg * t + 8u * t + hg * (uint32_t)m->att_ch + 2u * hg + 64u) + 64u >
                                m->c->info.max_shared_memory)
        m->att_ch /= 2;
}

static void qvk_model_settings(qvk_model* m, qvk_ctx* c, const qora_config* cfg, const qvk_model_opts* o,
                               const qvk_plan_t* plan) {
    m->c = c;
    m->cfg = *cfg;
    m->cfg.max_seq_len = o->max_seq_len;
    const int D = cfg->dim, H = cfg->hidden_dim;
    m->q_dim = cfg->n_heads * cfg->head_dim;
    m->kv_dim = cfg->n_kv_heads * cfg->head_dim;
    m->qkv_dim = m->q_dim + 2 * m->kv_dim;
    m->widest = D > m->q_dim ? D : m->q_dim;
    if (H > m->widest) m->widest = H;
    m->batch = plan->batch;
    m->logit_rows = plan->logit_rows;
    m->mv_threads = o->mv_threads > 0 ? (o->mv_threads > 256 ? 256 : o->mv_threads) : 0;
    m->mv_rows = o->mv_rows > 0 ? (o->mv_rows > 16 ? 16 : o->mv_rows) : 0;
    m->gu_rows = o->gu_rows > 0 ? (o->gu_rows > 16 ? 16 : o->gu_rows) : 0;
    qvk_attention_settings(m, o);
    m->act_w = ((uint32_t)m->widest + 127u) & ~127u;
    m->act_half = m->act_w + m->act_w / 4 + m->act_w / 16;
    m->f32_act = o->f32_act ? 1 : 0;
    m->coopmat = c->info.coopmat ? o->coopmat : 0;
    m->coop_min_tiles = o->coop_min_tiles > 0 ? (uint32_t)o->coop_min_tiles : QVK_COOP_MIN_TILES;
    const char* variant = getenv("QORA_VK_COOP_SHADER");
    snprintf(m->coop_shader, sizeof m->coop_shader, "%s", variant ? variant : "");
    m->int_dot = c->info.int_dot && (o->int_dot > 0 || (o->int_dot < 0 && c->info.int_dot_fast));
    m->fail_after = o->fail_after;
    m->kv_type = o->kv_type;
    m->chunk_rows = o->chunk_rows;
    m->use_slot_decode = 1; /* steps of up to this many decode rows run as decode steps (qvk_model_set_slot_decode) */
    m->sets.pool_sets = (uint32_t)(cfg->n_layers * 24 + 64);
}

/* Device buffers of the weights and of each layer's KV cache. */
static int qvk_alloc_weights(qvk_model* m, const qora_weights* w, char* err, size_t n) {
    qvk_ctx* c = m->c;
    const int D = m->cfg.dim, H = m->cfg.hidden_dim, V = m->cfg.vocab_size;
    int rc = qvk_matrix_alloc(m, &m->embed, w->tok_embeddings.dtype, V, D, m->chunk_rows, err, n);
    if (!rc && w->output.data != w->tok_embeddings.data) {
        rc = qvk_matrix_alloc(m, &m->output_own, w->output.dtype, V, D, m->chunk_rows, err, n);
        m->output = &m->output_own;
    } else {
        m->output = &m->embed;
    }
    const size_t kv_bytes = (size_t)m->cfg.max_seq_len * qvk_kv_row_bytes(m->kv_type, m->kv_dim);
    for (int l = 0; l < m->cfg.n_layers && !rc; l++) {
        const qora_layer* S = &w->layers[l];
        qvk_layer* L = &m->layers[l];
        L->use_rope = S->use_rope;
        /* one chunk each (checked by the plan): the fused modes need the whole matrix in one binding */
        qvk_qkv_split qs;
        qvk_split_qkv(S, m->q_dim, m->kv_dim, &qs);
        L->n_qkv = qs.n;
        for (int i = 0; i < qs.n && !rc; i++) {
            rc = qvk_matrix_alloc(m, &L->wqkv[i], qs.dtype[i], qs.rows[i], D, 0, err, n);
            L->wqkv[i].row0 = qs.row0[i];
        }
        if (!rc) rc = qvk_matrix_alloc(m, &L->wo, S->wo.dtype, D, m->q_dim, 0, err, n);
        L->n_gu = S->w_gate.dtype == S->w_up.dtype ? 1 : 2;
        for (int i = 0; i < L->n_gu && !rc; i++) {
            rc = qvk_matrix_alloc(m, &L->wgu[i], i ? S->w_up.dtype : S->w_gate.dtype, 2 * H / L->n_gu, D, 0, err, n);
            L->wgu[i].row0 = i * H;
        }
        if (!rc) rc = qvk_matrix_alloc(m, &L->wdown, S->w_down.dtype, D, H, 0, err, n);
        if (!rc) rc = qvk_buffer_new(c, (size_t)D * 4, QVK_MEM_DEVICE, &L->attn_norm, err, n);
        if (!rc) rc = qvk_buffer_new(c, (size_t)D * 4, QVK_MEM_DEVICE, &L->ffn_norm, err, n);
        if (!rc) rc = qvk_buffer_new(c, kv_bytes, QVK_MEM_DEVICE, &L->kc, err, n);
        if (!rc) rc = qvk_buffer_new(c, kv_bytes, QVK_MEM_DEVICE, &L->vc, err, n);
    }
    if (!rc) rc = qvk_buffer_new(c, (size_t)D * 4, QVK_MEM_DEVICE, &m->norm, err, n);
    return rc;
}

/* A timestamp query pool for the decode profile, only where the queue has timestamps (else the
   profile stays empty). */
static void qvk_profile_pool(qvk_model* m) {
    qvk_ctx* c = m->c;
    uint32_t nq = 0;
    c->f->vkGetPhysicalDeviceQueueFamilyProperties(c->pd, &nq, NULL);
    VkQueueFamilyProperties* qf = calloc(nq + 1, sizeof *qf);
    if (qf) c->f->vkGetPhysicalDeviceQueueFamilyProperties(c->pd, &nq, qf);
    if (qf && c->family < nq && qf[c->family].timestampValidBits) {
        VkQueryPoolCreateInfo qi = {VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO};
        qi.queryType = VK_QUERY_TYPE_TIMESTAMP;
        qi.queryCount = QVK_PROFILE_MAX;
        if (c->f->vkCreateQueryPool(c->dev, &qi, NULL, &m->qpool) != VK_SUCCESS) m->qpool = VK_NULL_HANDLE;
        m->ts_period = c->limits.timestampPeriod;
    }
    free(qf);
}

/* Scratch (shapes per prefill batch), attention splits, decode inputs and counters, the host-visible
   buffers and the two command buffers. */
static int qvk_alloc_scratch(qvk_model* m, int profile, char* err, size_t n) {
    qvk_ctx* c = m->c;
    const qora_config* cfg = &m->cfg;
    const size_t B = (size_t)m->batch, D = (size_t)cfg->dim, H = (size_t)cfg->hidden_dim, V = (size_t)cfg->vocab_size;
    int rc = qvk_buffer_new(c, B * D * 4, QVK_MEM_DEVICE, &m->x, err, n);
    if (!rc) rc = qvk_buffer_new(c, B * m->widest * 4, QVK_MEM_DEVICE, &m->xn, err, n);
    if (!rc) rc = qvk_buffer_new(c, B * (m->widest / 32 + 1) * 4, QVK_MEM_DEVICE, &m->xs, err, n);
    if (!rc) rc = qvk_buffer_new(c, B * m->qkv_dim * 4, QVK_MEM_DEVICE, &m->qkv, err, n);
    if (!rc) rc = qvk_buffer_new(c, B * m->q_dim * 4, QVK_MEM_DEVICE, &m->att, err, n);
    if (!rc) rc = qvk_buffer_new(c, B * 2 * H * 4, QVK_MEM_DEVICE, &m->gu, err, n);
    if (!rc) rc = qvk_buffer_new(c, (size_t)m->logit_rows * V * 4, QVK_MEM_DEVICE, &m->logits, err, n);
    /* decode attention partials: attn_decode (head, chunk) x (head_dim + 2); attn_decode2 (head group,
       chunk, then block) x (hg head_dim + 16), and its counters per head group and per block */
    const size_t groups = (size_t)cfg->n_heads / m->att_hg, hd = (size_t)cfg->head_dim;
    const size_t part = m->att_kernel == 2 ? groups * ((size_t)m->att_ch + QVK_ATT2_MB) * (m->att_hg * hd + 16)
                                           : (size_t)cfg->n_heads * (size_t)m->att_ch * (hd + 2);
    if (!rc) rc = qvk_buffer_new(c, part * 4, QVK_MEM_DEVICE, &m->att_part, err, n);
    if (!rc) rc = qvk_buffer_new(c, groups * (1 + QVK_ATT2_MB) * 4, QVK_MEM_DEVICE, &m->att_done, err, n);
    if (!rc) rc = qvk_buffer_new(c, (size_t)m->act_half * 2 * 4, QVK_MEM_DEVICE, &m->act, err, n);
    /* slot 0: whole-dispatch epilogues; 1 + b: per-Q8-block ones */
    if (!rc) rc = qvk_buffer_new(c, ((size_t)m->act_w / 32 + 8) * 4, QVK_MEM_DEVICE, &m->cnt, err, n);
    if (!rc && profile) qvk_profile_pool(m);
    if (!rc) rc = qvk_buffer_new(c, (size_t)m->logit_rows * V * 4, QVK_MEM_READBACK, &m->readback, err, n);
    if (!rc) rc = qvk_buffer_new(c, (4 + B) * 4, QVK_MEM_UPLOAD, &m->params, err, n);
    if (!rc) rc = qvk_buffer_new(c, B * cfg->head_dim * 4, QVK_MEM_UPLOAD, &m->rope, err, n);
    if (!rc) rc = qvk_buffer_new(c, 16, QVK_MEM_UPLOAD, &m->att_args, err, n);
    if (!rc) rc = qvk_buffer_new(c, (2 + QVK_SAMPLE_MAX_GATHER) * 4, QVK_MEM_UPLOAD, &m->sample_in, err, n);
    if (!rc) rc = qvk_buffer_new(c, QVK_SAMPLE_OUT_WORDS * 4, QVK_MEM_DEVICE, &m->sample_out, err, n);
    if (!rc) {
        m->cb_decode_topk = qvk_cmd_new(c);
        m->cb_copy = qvk_cmd_new(c);
        if (!m->cb_decode_topk || !m->cb_copy) rc = qvk_fail(err, n, QVK_ERR_VK, "vkAllocateCommandBuffers failed");
    }
    if (!rc) {
        m->cb_decode = qvk_cmd_new(c);
        m->cb_prefill = qvk_cmd_new(c);
        if (!m->cb_decode || !m->cb_prefill) rc = qvk_fail(err, n, QVK_ERR_VK, "vkAllocateCommandBuffers failed");
    }
    return rc;
}

/* Every weight through the staging buffer, packed to the device layout on the way. */
static int qvk_upload_weights(qvk_model* m, const qora_weights* w, qvk_buffer* stage, VkCommandBuffer cb, char* err,
                              size_t n) {
    const int D = m->cfg.dim, H = m->cfg.hidden_dim, V = m->cfg.vocab_size;
    qvk_part emb = {w->tok_embeddings.data, V};
    int rc = qvk_upload_matrix(m, &m->embed, &emb, 1, stage, cb, err, n);
    if (!rc && m->output == &m->output_own) {
        qvk_part p = {w->output.data, V};
        rc = qvk_upload_matrix(m, &m->output_own, &p, 1, stage, cb, err, n);
    }
    for (int l = 0; l < m->cfg.n_layers && !rc; l++) {
        const qora_layer* S = &w->layers[l];
        qvk_layer* L = &m->layers[l];
        qvk_part qkv[3] = {{S->wq.data, m->q_dim}, {S->wk.data, m->kv_dim}, {S->wv.data, m->kv_dim}};
        qvk_part gu[2] = {{S->w_gate.data, H}, {S->w_up.data, H}};
        qvk_part wo = {S->wo.data, D}, down = {S->w_down.data, D};
        qvk_qkv_split qs;
        qvk_split_qkv(S, m->q_dim, m->kv_dim, &qs);
        for (int i = 0; i < qs.n && !rc; i++)
            rc = qvk_upload_matrix(m, &L->wqkv[i], qkv + qs.first[i], qs.count[i], stage, cb, err, n);
        if (!rc) rc = qvk_upload_matrix(m, &L->wo, &wo, 1, stage, cb, err, n);
        for (int i = 0; i < L->n_gu && !rc; i++)
            rc = qvk_upload_matrix(m, &L->wgu[i], gu + i, 3 - L->n_gu, stage, cb, err, n);
        if (!rc) rc = qvk_upload_matrix(m, &L->wdown, &down, 1, stage, cb, err, n);
        if (!rc) rc = qvk_upload_f32(m, &L->attn_norm, S->attn_norm, (size_t)D, stage, cb, err, n);
        if (!rc) rc = qvk_upload_f32(m, &L->ffn_norm, S->ffn_norm, (size_t)D, stage, cb, err, n);
    }
    if (!rc) rc = qvk_upload_f32(m, &m->norm, w->norm, (size_t)D, stage, cb, err, n);
    return rc;
}

/* The split counters start at zero; the merging workgroup resets its own. */
static int qvk_zero_counters(qvk_model* m, VkCommandBuffer cb, char* err, size_t n) {
    qvk_ctx* c = m->c;
    if (qvk_cmd_begin(c, cb, 1) != VK_SUCCESS) return qvk_fail(err, n, QVK_ERR_VK, "vkBeginCommandBuffer failed");
    c->f->vkCmdFillBuffer(cb, m->att_done.buf, 0, VK_WHOLE_SIZE, 0);
    c->f->vkCmdFillBuffer(cb, m->cnt.buf, 0, VK_WHOLE_SIZE, 0);
    if (c->f->vkEndCommandBuffer(cb) != VK_SUCCESS) return qvk_fail(err, n, QVK_ERR_VK, "vkEndCommandBuffer failed");
    return qvk_submit_wait(c, cb, err, n);
}

/* Fill the device buffers: weights and norms uploaded, counters zeroed (on the prefill command buffer,
   not yet recorded). */
static int qvk_model_fill(qvk_model* m, const qora_weights* w, char* err, size_t n) {
    qvk_buffer stage = {0};
    size_t sz = (size_t)64 << 20, need = (size_t)m->cfg.dim * 4 + 64;
    if (need > sz) sz = need;
    int rc = qvk_buffer_new(m->c, sz, QVK_MEM_STAGING, &stage, err, n);
    if (!rc) rc = qvk_upload_weights(m, w, &stage, m->cb_prefill, err, n);
    if (!rc) rc = qvk_zero_counters(m, m->cb_prefill, err, n);
    if (stage.buf) qvk_buffer_free(m->c, &stage);
    return rc;
}

int qvk_model_create(qvk_ctx* c, const qora_config* cfg, const qora_weights* w, const qvk_model_opts* o,
                     qvk_model** out, char* err, size_t n) {
    *out = NULL;
    qvk_plan_t plan;
    int rc = qvk_plan(c, cfg, w, o, &plan, err, n);
    if (rc) return rc;
    qvk_model* m = calloc(1, sizeof *m);
    if (!m) return qvk_fail(err, n, QVK_ERR_OOM, "out of host memory");
    qvk_model_settings(m, c, cfg, o, &plan);
    m->inv_freq = malloc((size_t)cfg->head_dim / 2 * sizeof(float));
    m->layers = calloc((size_t)cfg->n_layers, sizeof *m->layers);
    if (!m->inv_freq || !m->layers) {
        qvk_model_destroy(m);
        return qvk_fail(err, n, QVK_ERR_OOM, "out of host memory");
    }
    memcpy(m->inv_freq, w->inv_freq, (size_t)cfg->head_dim / 2 * sizeof(float));
    /* every device buffer first: a model that does not fit fails here, before any upload */
    rc = qvk_alloc_weights(m, w, err, n);
    if (!rc) rc = qvk_alloc_scratch(m, o->profile, err, n);
    if (!rc) rc = qvk_model_fill(m, w, err, n);
    if (rc) {
        qvk_model_destroy(m);
        return rc;
    }
    *out = m;
    return QVK_OK;
}

int qvk_model_batch(const qvk_model* m) { return m->batch; }
int qvk_model_logit_rows(const qvk_model* m) { return m->logit_rows; }

/* ---------------------------------------------------------------- recording */

enum { QVK_STORE = 0, QVK_ADD = 1, QVK_SWIGLU = 2, QVK_QKV = 3 };

typedef struct { /* matvec.comp's push constants */
    uint32_t rows, cols, in_base, y_off, act_w;
    uint32_t q_dim, kv_dim, head_dim, use_rope;
    uint32_t epi_n, out_base;
    float eps;
    uint32_t row0;
} qvk_mv_push;

typedef struct {
    uint32_t n, src, out_base, act_w;
    float eps;
} qvk_quant_push;

enum { QVK_EPI_NONE = 0, QVK_EPI_QUANT = 1, QVK_EPI_NORM = 2 };

typedef struct {
    uint32_t rows, cols, n_tok, ldx, ldy, y_off;
} qvk_mm_push;

typedef struct {
    uint32_t n, ld_in, ld_out;
    float eps;
} qvk_prep_push;

typedef struct {
    uint32_t n_heads, n_kv_heads, head_dim, ld, use_rope;
} qvk_rope_push;

typedef struct {
    uint32_t n_heads, n_kv_heads, head_dim, ld_q, ld_out, out_base, act_w;
} qvk_att_push;

typedef struct {
    uint32_t rows, cols, r0, ld;
} qvk_embed_push;

/* Q4/Q8 products with Q8 activations and integer block sums (the "q8" precision, the CPU engine's
   arithmetic for them); every other product takes float activations. */
static int qvk_int_path(const qvk_model* m, int dtype) {
    return !m->f32_act && (dtype == QORA_Q4 || dtype == QORA_Q8);
}

/* The shader variant suffix of a product with float activations on Q4/Q8 weights ("_f"). */
static const char* qvk_float_suffix(const qvk_model* m, int dtype) {
    return m->f32_act && (dtype == QORA_Q4 || dtype == QORA_Q8) ? "_f" : "";
}

/* rows per decode workgroup: enough bytes per workgroup to keep loads in flight, enough
   workgroups to fill the device. 4 for every product: an H100 decoded tg128 at 440-448 tok/s
   with 4 rows for the down projection (11008 columns) against 419 with 2, and slower with 8 or
   16 for gate|up (QORA_VK_GU_ROWS: 425, 415). */
static uint32_t qvk_mv_rows(const qvk_model* m, int mode) {
    uint32_t r = m->mv_rows ? (uint32_t)m->mv_rows : 4u;
    if (mode == QVK_SWIGLU && m->gu_rows) r = (uint32_t)m->gu_rows;
    if (mode == QVK_SWIGLU) r = (r + 1) & ~1u;  /* gate and up rows in pairs */
    if (mode == QVK_QKV) r = (r + 3) & ~3u;     /* rotation quads */
    return r;
}

/* threads per decode workgroup: about three input units (a 32-element block, a quarter K super-block,
   8 f16 / bf16, 4 f32) per thread, so long rows (the down projection) keep more loads in flight, and
   64 at least (one 2048-wide Q4 row is exactly 64 blocks), 32 where a row has fewer than 64 units (a
   2048-wide K-type row has 32: no idle half workgroup) */
static uint32_t qvk_mv_threads(const qvk_model* m, int dtype, int cols) {
    if (m->mv_threads) return (uint32_t)m->mv_threads;
    qvk_layout_t L;
    const int unit = qvk_layout(dtype, &L) ? (L.elems == QK_K ? 64 : QK) : dtype == QORA_F32 ? 4 : 8;
    const int want = (cols / unit + 2) / 3;
    uint32_t t = cols / unit < 64 ? 32 : 64;
    while ((int)t < want && t < 256) t *= 2;
    return t;
}

typedef struct {
    qvk_model* m;
    VkCommandBuffer cb;
    char* err;
    size_t n;
    int rc;
    int prof;          /* write a timestamp after each step (profiled decode) */
    const char* label; /* what the next dispatch is called in the profile */
    VkBuffer indirect; /* the next dispatch's workgroup counts are in this buffer (else none) */
    int batch;         /* a batched step: the slots' caches, per-row cache rows, attention per entry */
    int slot1;         /* a decode step over slot slot1 - 1's cache (its aliases); 0: the model's own cache */
} qvk_rec;

/* The key (v = 0) or value cache a step binds: the slots' (batched), one slot's, or the model's own. */
static VkBuffer qvk_kv(const qvk_rec* R, const qvk_layer* L, int v) {
    if (R->batch) return v ? L->vb.buf : L->kb.buf;
    if (R->slot1) return v ? L->vslot[R->slot1 - 1] : L->kslot[R->slot1 - 1];
    return v ? L->vc.buf : L->kc.buf;
}

static void qvk_rec_dispatch(qvk_rec* R, const char* shader, const uint32_t* spec, int n_spec, const VkBuffer* binds,
                             const void* push, size_t push_bytes, uint32_t gx, uint32_t gy, uint32_t gz,
                             int barrier) {
    if (R->rc) return;
    qvk_ctx* c = R->m->c;
    VkPipeline pipe = qvk_pipeline(c, shader, spec, n_spec, R->err, R->n);
    if (!pipe) {
        R->rc = QVK_ERR_VK;
        return;
    }
    R->rc = qvk_dispatch(c, &R->m->sets, R->cb, pipe, binds, push, push_bytes, gx, gy, gz, R->indirect, R->err, R->n);
    if (!R->rc && barrier) qvk_compute_barrier(c, R->cb);
    if (!R->rc && barrier && R->prof && R->m->n_ts < QVK_PROFILE_MAX) {
        R->m->ts_label[R->m->n_ts] = R->label ? R->label : shader;
        c->f->vkCmdWriteTimestamp(R->cb, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, R->m->qpool, (uint32_t)R->m->n_ts++);
    }
}

/* A decode product y = W x with x prepared in the activation half at in_base; epi: the last
   workgroup prepares y[0, epi_n) (normalized with nq for QVK_EPI_NORM) into the half at out_base. */
static void qvk_rec_matvec(qvk_rec* R, const qvk_matrix* M, int mode, uint32_t in_base, VkBuffer y, uint32_t y_off,
                           VkBuffer kc, VkBuffer vc, int use_rope, int epi, VkBuffer nq, uint32_t epi_n,
                           uint32_t out_base) {
    qvk_model* m = R->m;
    char name[32];
    const int intq = qvk_int_path(m, M->dtype), dot = m->int_dot && intq;
    snprintf(name, sizeof name, "matvec_%s%s", qvk_dtype_name(M->dtype), dot ? "_dot" : qvk_float_suffix(m, M->dtype));
    const uint32_t rows_per = qvk_mv_rows(m, mode);
    const uint32_t spec[5] = {qvk_mv_threads(m, M->dtype, M->cols), rows_per, (uint32_t)mode, (uint32_t)epi,
                              (uint32_t)m->kv_type};
    if (epi && M->n_chunks != 1) { /* the epilogue counts the workgroups of one dispatch */
        R->rc = qvk_fail(R->err, R->n, QVK_ERR_ARGS, "a chunked matrix cannot finish with an epilogue");
        return;
    }
    for (int i = 0; i < M->n_chunks; i++) {
        const qvk_chunk* ch = &M->chunks[i];
        qvk_mv_push p = {(uint32_t)ch->rows, (uint32_t)M->cols, in_base, y_off + (uint32_t)ch->r0, m->act_w,
                         (uint32_t)m->q_dim, (uint32_t)m->kv_dim, (uint32_t)m->cfg.head_dim, (uint32_t)use_rope,
                         epi_n, out_base, m->cfg.norm_eps, (uint32_t)M->row0};
        uint32_t groups;
        if (mode == QVK_SWIGLU) {
            p.rows = (uint32_t)ch->rows / 2; /* the gate half */
            groups = (p.rows + rows_per / 2 - 1) / (rows_per / 2);
        } else if (mode == QVK_QKV) {
            groups = ((uint32_t)ch->rows / 4 + rows_per / 4 - 1) / (rows_per / 4);
        } else {
            groups = ((uint32_t)ch->rows + rows_per - 1) / rows_per;
        }
        VkBuffer b[QVK_BINDINGS] = {ch->buf.buf, 0, 0, y, kc, vc, m->params.buf, m->rope.buf, m->act.buf, m->cnt.buf, nq, 0};
        qvk_rec_dispatch(R, name, spec, 5, b, &p, sizeof p, groups, 1, 1, i == M->n_chunks - 1);
    }
}

/* Prepare n elements of src from element `off` (normalized with nq if given) into the activation
   half at out_base, in one workgroup. */
static void qvk_rec_quant(qvk_rec* R, VkBuffer src, uint32_t off, uint32_t n_el, VkBuffer nq, uint32_t out_base) {
    qvk_model* m = R->m;
    const uint32_t spec[2] = {256, nq ? 1u : 0u};
    qvk_quant_push p = {n_el, off, out_base, m->act_w, m->cfg.norm_eps};
    VkBuffer b[QVK_BINDINGS] = {0, 0, 0, src, 0, 0, 0, 0, m->act.buf, m->cnt.buf, nq, 0};
    qvk_rec_dispatch(R, "quant", spec, 2, b, &p, sizeof p, 1, 1, 1, 1);
}

/* silu(y[0, n)) * y[n, 2n) prepared into the activation half at out_base (one workgroup): the
   gate|up product when gate and up are stored in different types. */
static void qvk_rec_quant_swiglu(qvk_rec* R, VkBuffer gu, uint32_t n_el, uint32_t out_base) {
    qvk_model* m = R->m;
    const uint32_t spec[3] = {256, 0, 1};
    qvk_quant_push p = {n_el, 0, out_base, m->act_w, m->cfg.norm_eps};
    VkBuffer b[QVK_BINDINGS] = {0, 0, 0, gu, 0, 0, 0, 0, m->act.buf, m->cnt.buf, 0, 0};
    qvk_rec_dispatch(R, "quant", spec, 3, b, &p, sizeof p, 1, 1, 1, 1);
}

/* Whether the prefill product with M over nt tokens runs on cooperative matrices: it then takes the
   float input (prep without Q8), the f16 tiles of matmul_coop.comp. Only products with enough
   128 x 128 tiles to fill the device: measured on an H100 (132 SMs), the tensor-core kernel won on
   qkv (96 tiles at 512 tokens: 296 vs 350 us) and gate|up (688: 1448 vs 1927 us) and lost on wo and
   down (64 tiles: 252 vs 179, 1074 vs 911 us) to the 64 x 64 fp32 path's 4x as many workgroups
   (QVK_COOP_MIN_TILES; QORA_VK_COOP_MIN_TILES overrides it). */
static int qvk_coop(const qvk_model* m, const qvk_matrix* M, uint32_t nt) {
    const uint32_t tiles = (((uint32_t)M->rows + 127u) / 128u) * ((nt + 127u) / 128u);
    return m->coopmat && M->dtype >= QORA_F32 && M->dtype <= QORA_Q4 && (m->coopmat == 2 || tiles >= m->coop_min_tiles);
}

/* the prefill input of a product with M is quantized to Q8 (the integer matmul.comp path) */
static int qvk_mm_q8(const qvk_model* m, const qvk_matrix* M, uint32_t nt) {
    return qvk_int_path(m, M->dtype) && !qvk_coop(m, M, nt);
}

static void qvk_rec_matmul(qvk_rec* R, const qvk_matrix* M, int mode, VkBuffer x, uint32_t ldx, VkBuffer y,
                           uint32_t ldy, uint32_t n_tok) {
    char name[32];
    const int coop = qvk_coop(R->m, M, n_tok);
    const uint32_t tile = coop ? 128u : 64u;
    if (!coop)
        snprintf(name, sizeof name, "matmul_%s%s", qvk_dtype_name(M->dtype), qvk_float_suffix(R->m, M->dtype));
    else if (M->dtype == QORA_Q4 && R->m->coop_shader[0])
        snprintf(name, sizeof name, "%s", R->m->coop_shader);
    else
        snprintf(name, sizeof name, "matmul_coop_%s", qvk_dtype_name(M->dtype));
    const uint32_t spec[2] = {0, (uint32_t)mode};
    for (int i = 0; i < M->n_chunks; i++) {
        const qvk_chunk* ch = &M->chunks[i];
        qvk_mm_push p = {(uint32_t)ch->rows, (uint32_t)M->cols, n_tok, ldx, ldy, (uint32_t)(M->row0 + ch->r0)};
        VkBuffer b[QVK_BINDINGS] = {ch->buf.buf, x, R->m->xs.buf, y};
        qvk_rec_dispatch(R, name, spec, 2, b, &p, sizeof p, ((uint32_t)ch->rows + tile - 1) / tile,
                         (n_tok + tile - 1) / tile, 1, i == M->n_chunks - 1);
    }
}

/* norm (nw != 0), swiglu, and/or Q8 quantization (q8) of n_tok rows into xn (+ scales in xs) */
static void qvk_rec_prep(qvk_rec* R, VkBuffer x, uint32_t n_el, uint32_t ld_in, VkBuffer nw, int swiglu, int q8,
                         uint32_t n_tok) {
    qvk_model* m = R->m;
    const uint32_t spec[4] = {0, nw ? 1u : 0u, q8 ? 1u : 0u, swiglu ? 1u : 0u};
    qvk_prep_push p = {n_el, ld_in, n_el, m->cfg.norm_eps};
    VkBuffer b[QVK_BINDINGS] = {0, x, nw, m->xn.buf, m->xs.buf};
    qvk_rec_dispatch(R, "prep", spec, 4, b, &p, sizeof p, n_tok, 1, 1, 1);
}

static void qvk_rec_embed(qvk_rec* R, uint32_t n_tok) {
    qvk_model* m = R->m;
    char name[32];
    snprintf(name, sizeof name, "embed_%s", qvk_dtype_name(m->embed.dtype));
    for (int i = 0; i < m->embed.n_chunks; i++) {
        const qvk_chunk* ch = &m->embed.chunks[i];
        qvk_embed_push p = {(uint32_t)ch->rows, (uint32_t)m->embed.cols, (uint32_t)ch->r0, (uint32_t)m->cfg.dim};
        VkBuffer b[QVK_BINDINGS] = {ch->buf.buf, 0, 0, m->x.buf, 0, 0, m->params.buf};
        qvk_rec_dispatch(R, name, NULL, 0, b, &p, sizeof p, n_tok, 1, 1, i == m->embed.n_chunks - 1);
    }
}

/* The chunks of the context decode attention uses at n_pos positions: the shader's rule (at least
   att_short positions per chunk, at most att_ch chunks; attn_decode.comp: whole tiles). */
static uint32_t qvk_att_chunks(const qvk_model* m, uint32_t n_pos) {
    const uint32_t t = m->att_kernel == 2 ? 1u : QVK_ATT_THREADS, ch = (uint32_t)m->att_ch;
    uint32_t per = (n_pos + ch - 1) / ch;
    if (per < m->att_short) per = m->att_short;
    per = (per + t - 1) / t * t;
    return (n_pos + per - 1) / per;
}

/* attn_prefill.comp's specialization (threads, KV16, head_dim, HG, BK, TS); returns the tokens per
   workgroup. TS threads per query row keep at most 64 of its dimensions each (head_dim 8..256, a
   multiple of 8: head_dim / TS is a multiple of 4); about 64 rows (query heads x tokens) per
   workgroup; key tiles as long as the K and V tiles and the partial dots fit 48 KB of shared memory
   (or what the device has). */
static uint32_t qvk_flash_shape(const qvk_model* m, uint32_t spec[6]) {
    const uint32_t hd = (uint32_t)m->cfg.head_dim, ts = hd <= 64 ? 1u : hd <= 128 ? 2u : 4u;
    const uint32_t rows = ts == 4 ? 32u : 64u, bq = rows / m->att_hg ? rows / m->att_hg : 1u;
    const uint32_t threads = bq * m->att_hg * ts;
    const uint32_t shared = m->c->info.max_shared_memory < 49152 ? m->c->info.max_shared_memory : 49152;
    uint32_t bk = (shared - 256) / (8u * hd + 4u * threads);
    if (bk > 32) bk = 32;
    if (bk > 8) bk &= ~7u;
    spec[0] = threads;
    spec[1] = (uint32_t)m->kv_type;
    spec[2] = hd;
    spec[3] = m->att_hg;
    spec[4] = bk;
    spec[5] = ts;
    return bq;
}

/* Decode (n_tok == 1): attn_decode.comp, a workgroup per (head group, chunk of positions), the
   output quantized for wo into the activation half at out_base. Prefill: attn_prefill.comp, a
   workgroup per (head group, tile of tokens). A batched step (however many rows, one included):
   attn_prefill.comp per entry over its slot's cache. */
static void qvk_rec_attention(qvk_rec* R, const qvk_layer* L, uint32_t n_tok, uint32_t out_base) {
    qvk_model* m = R->m;
    const uint32_t hd = (uint32_t)m->cfg.head_dim, hg = m->att_hg, groups = (uint32_t)m->cfg.n_heads / hg;
    qvk_att_push p = {(uint32_t)m->cfg.n_heads, (uint32_t)m->cfg.n_kv_heads, hd, (uint32_t)m->qkv_dim,
                      (uint32_t)m->q_dim, out_base, m->act_w};
    VkBuffer b[QVK_BINDINGS] = {m->att_part.buf, m->qkv.buf, 0, m->att.buf, qvk_kv(R, L, 0), qvk_kv(R, L, 1), m->params.buf,
                                m->att_done.buf, m->act.buf, m->cnt.buf};
    if (R->batch) { /* one z per entry, each over its own slot (SEG) */
        uint32_t spec[7];
        const uint32_t bq = qvk_flash_shape(m, spec);
        spec[6] = 1;
        b[8] = m->seg.buf, b[7] = b[9] = 0;
        qvk_rec_dispatch(R, "attn_prefill", spec, 7, b, &p, sizeof p, groups, (m->b_max_n + bq - 1) / bq, m->b_n_ent, 1);
    } else if (n_tok == 1) {
        /* only the chunks the context fills are launched (qvk_att_chunks, written per step) */
        const int k2 = m->att_kernel == 2;
        const uint32_t spec[8] = {k2 ? m->att_t : QVK_ATT_THREADS, (uint32_t)m->kv_type, hd, hg, (uint32_t)m->att_ch,
                                  m->att_short, 1u, m->att_c};
        R->indirect = m->att_args.buf;
        qvk_rec_dispatch(R, k2 ? "attn_decode2" : "attn_decode", spec, k2 ? 8 : 7, b, &p, sizeof p, groups,
                         (uint32_t)m->att_ch, 1, 1);
        R->indirect = VK_NULL_HANDLE;
    } else {
        uint32_t spec[6];
        const uint32_t bq = qvk_flash_shape(m, spec);
        qvk_rec_dispatch(R, "attn_prefill", spec, 6, b, &p, sizeof p, groups, (n_tok + bq - 1) / bq, 1, 1);
    }
}

/* rows of logits in src copied back to the host-visible dst. */
static void qvk_rec_copy_back(qvk_rec* R, VkBuffer src, VkBuffer dst, uint32_t rows) {
    if (R->rc) return;
    qvk_model* m = R->m;
    qvk_ctx* c = m->c;
    qvk_barrier(c, R->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT,
                VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_READ_BIT);
    VkBufferCopy region = {0, 0, (VkDeviceSize)rows * m->cfg.vocab_size * 4};
    c->f->vkCmdCopyBuffer(R->cb, src, dst, 1, &region);
    qvk_barrier(c, R->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT, VK_PIPELINE_STAGE_HOST_BIT,
                VK_ACCESS_HOST_READ_BIT);
}

/* The LM head's rows copied back to the host. */
static void qvk_rec_readback(qvk_rec* R, uint32_t rows) { qvk_rec_copy_back(R, R->m->logits.buf, R->m->readback.buf, rows); }

/* rope_kv.comp over n_tok tokens of qkv: RoPE (use_rope) and their k, v into the layer's cache. */
static void qvk_rec_rope_kv(qvk_rec* R, const qvk_layer* L, uint32_t n_tok, int use_rope) {
    qvk_model* m = R->m;
    qvk_rope_push rp = {(uint32_t)m->cfg.n_heads, (uint32_t)m->cfg.n_kv_heads, (uint32_t)m->cfg.head_dim,
                        (uint32_t)m->qkv_dim, (uint32_t)use_rope};
    VkBuffer rb[QVK_BINDINGS] = {0, 0, 0, m->qkv.buf, qvk_kv(R, L, 0), qvk_kv(R, L, 1),
                                 m->params.buf, m->rope.buf, R->batch ? m->rowmap.buf : 0};
    const uint32_t kv_spec[3] = {0, (uint32_t)m->kv_type, R->batch ? 1u : 0u};
    qvk_rec_dispatch(R, "rope_kv", kv_spec, R->batch ? 3 : 2, rb, &rp, sizeof rp, n_tok, 1, 1, 1);
}

/* Begin recording a step (once: a one-time submission): the host's writes before the submission
   (params, RoPE table, tokens) made visible to the shaders and, when profiling, the query pool reset
   and the first timestamp written. */
static int qvk_rec_begin(qvk_rec* R, int once) {
    qvk_model* m = R->m;
    if (qvk_cmd_begin(m->c, R->cb, once) != VK_SUCCESS)
        return qvk_fail(R->err, R->n, QVK_ERR_VK, "vkBeginCommandBuffer failed");
    qvk_barrier(m->c, R->cb, VK_PIPELINE_STAGE_HOST_BIT, VK_ACCESS_HOST_WRITE_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
                VK_ACCESS_SHADER_READ_BIT);
    if (R->prof) {
        m->n_ts = 0;
        m->c->f->vkCmdResetQueryPool(R->cb, m->qpool, 0, QVK_PROFILE_MAX);
        m->ts_label[m->n_ts] = "start";
        m->c->f->vkCmdWriteTimestamp(R->cb, VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, m->qpool, (uint32_t)m->n_ts++);
    }
    return QVK_OK;
}

/* End recording a step: the recording's first error, else vkEndCommandBuffer's. */
static int qvk_rec_end(qvk_rec* R) {
    if (R->m->c->f->vkEndCommandBuffer(R->cb) != VK_SUCCESS && !R->rc)
        R->rc = qvk_fail(R->err, R->n, QVK_ERR_VK, "vkEndCommandBuffer failed");
    return R->rc;
}

/* One token (position from the params buffer): the whole step in one command buffer. Each
   product's input is prepared by the dispatch before it, alternating between the activation
   halves A and B: embed, quant (attn norm) -> A; per layer qkv(A), attention -> B, wo(B) + ffn norm
   -> A, gate/up(A) -> B, down(B) + next norm -> A; LM head(A). */
static void qvk_rec_topk(qvk_rec* R);

static int qvk_record_decode(qvk_model* m, VkCommandBuffer cb, int topk, int slot1, char* err, size_t n) {
    qvk_rec R = {m, cb, err, n, 0, m->qpool != VK_NULL_HANDLE, NULL, VK_NULL_HANDLE, 0, slot1};
    const uint32_t A = 0, B = m->act_half, D = (uint32_t)m->cfg.dim;
    const int rc = qvk_rec_begin(&R, 0);
    if (rc) return rc;
    R.label = "embed";
    qvk_rec_embed(&R, 1);
    R.label = "quant";
    qvk_rec_quant(&R, m->x.buf, 0, D, m->layers[0].attn_norm.buf, A);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const qvk_layer* L = &m->layers[l];
        VkBuffer next_norm = l + 1 < m->cfg.n_layers ? m->layers[l + 1].attn_norm.buf : m->norm.buf;
        R.label = "qkv";
        for (int i = 0; i < L->n_qkv; i++)
            qvk_rec_matvec(&R, &L->wqkv[i], QVK_QKV, A, m->qkv.buf, 0, qvk_kv(&R, L, 0), qvk_kv(&R, L, 1), L->use_rope, QVK_EPI_NONE, 0,
                           0, 0);
        if (m->kv_type == QORA_Q8) { /* the products left k and v in qkv: whole Q8 blocks into the cache */
            R.label = "kv_q8";
            qvk_rec_rope_kv(&R, L, 1, 0);
        }
        R.label = "attention";
        qvk_rec_attention(&R, L, 1, B);
        R.label = "wo";
        qvk_rec_matvec(&R, &L->wo, QVK_ADD, B, m->x.buf, 0, 0, 0, 0, QVK_EPI_NORM, L->ffn_norm.buf, D, A);
        R.label = "gate_up";
        if (L->n_gu == 1) {
            qvk_rec_matvec(&R, &L->wgu[0], QVK_SWIGLU, A, m->xn.buf, 0, 0, 0, 0, QVK_EPI_QUANT, 0,
                           (uint32_t)m->cfg.hidden_dim, B);
        } else { /* gate and up in two types: each product on its own, then silu(gate) * up prepared for down */
            const uint32_t H = (uint32_t)m->cfg.hidden_dim;
            qvk_rec_matvec(&R, &L->wgu[0], QVK_STORE, A, m->gu.buf, 0, 0, 0, 0, QVK_EPI_NONE, 0, 0, 0);
            qvk_rec_matvec(&R, &L->wgu[1], QVK_STORE, A, m->gu.buf, H, 0, 0, 0, QVK_EPI_NONE, 0, 0, 0);
            qvk_rec_quant_swiglu(&R, m->gu.buf, H, B);
        }
        R.label = "down";
        qvk_rec_matvec(&R, &L->wdown, QVK_ADD, B, m->x.buf, 0, 0, 0, 0, QVK_EPI_NORM, next_norm, D, A);
    }
    R.label = "lm_head";
    qvk_rec_matvec(&R, m->output, QVK_STORE, A, m->logits.buf, 0, 0, 0, 0, QVK_EPI_NONE, 0, 0, 0);
    if (topk)
        qvk_rec_topk(&R);
    else
        qvk_rec_readback(&R, 1);
    return qvk_rec_end(&R);
}

/* Every layer over nt token rows: batched products, RoPE + cache, attention (a prefill, or with
   R->batch a batched step over several sequences' slots). */
static void qvk_rec_layers(qvk_rec* R, uint32_t nt) {
    qvk_model* m = R->m;
    const uint32_t D = (uint32_t)m->cfg.dim, H = (uint32_t)m->cfg.hidden_dim;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const qvk_layer* L = &m->layers[l];
        /* attention norm, q/k/v, RoPE + cache, attention */
        for (int i = 0; i < L->n_qkv; i++) { /* the input again only where the next piece takes it otherwise */
            const int intq = qvk_mm_q8(m, &L->wqkv[i], nt);
            R->label = "pp:prep";
            if (i == 0 || intq != qvk_mm_q8(m, &L->wqkv[i - 1], nt))
                qvk_rec_prep(R, m->x.buf, D, D, L->attn_norm.buf, 0, intq, nt);
            R->label = "pp:qkv";
            qvk_rec_matmul(R, &L->wqkv[i], QVK_STORE, m->xn.buf, D, m->qkv.buf, (uint32_t)m->qkv_dim, nt);
        }
        R->label = "pp:rope_kv";
        qvk_rec_rope_kv(R, L, nt, L->use_rope);
        R->label = "pp:attention";
        qvk_rec_attention(R, L, nt, 0);
        /* output projection + residual */
        VkBuffer att_in = m->att.buf;
        if (qvk_mm_q8(m, &L->wo, nt)) {
            R->label = "pp:prep";
            qvk_rec_prep(R, m->att.buf, (uint32_t)m->q_dim, (uint32_t)m->q_dim, 0, 0, 1, nt);
            att_in = m->xn.buf;
        }
        R->label = "pp:wo";
        qvk_rec_matmul(R, &L->wo, QVK_ADD, att_in, (uint32_t)m->q_dim, m->x.buf, D, nt);
        /* MLP norm, gate|up, swiglu, down + residual */
        for (int i = 0; i < L->n_gu; i++) {
            const int intq = qvk_mm_q8(m, &L->wgu[i], nt);
            R->label = "pp:prep";
            if (i == 0 || intq != qvk_mm_q8(m, &L->wgu[0], nt))
                qvk_rec_prep(R, m->x.buf, D, D, L->ffn_norm.buf, 0, intq, nt);
            R->label = "pp:gate_up";
            qvk_rec_matmul(R, &L->wgu[i], QVK_STORE, m->xn.buf, D, m->gu.buf, 2 * H, nt);
        }
        R->label = "pp:prep";
        qvk_rec_prep(R, m->gu.buf, H, 2 * H, 0, 1, qvk_mm_q8(m, &L->wdown, nt), nt);
        R->label = "pp:down";
        qvk_rec_matmul(R, &L->wdown, QVK_ADD, m->xn.buf, H, m->x.buf, D, nt);
    }
}

/* A one-time step over nt token rows (prefill, the batched step): begun, embedded, every layer recorded. */
static int qvk_rec_rows(qvk_rec* R, uint32_t nt) {
    const int rc = qvk_rec_begin(R, 1);
    if (rc) return rc;
    R->label = "pp:embed";
    qvk_rec_embed(R, nt);
    qvk_rec_layers(R, nt);
    return QVK_OK;
}

/* n_tok > 1 tokens: batched products; logits for every token (all_logits) or the last. */
static int qvk_record_prefill(qvk_model* m, VkCommandBuffer cb, uint32_t nt, int all_logits, char* err, size_t n) {
    qvk_rec R = {m, cb, err, n, 0, m->qpool != VK_NULL_HANDLE, NULL};
    const uint32_t D = (uint32_t)m->cfg.dim;
    const int rc = qvk_rec_rows(&R, nt);
    if (rc) return rc;
    R.label = "pp:lm_head";
    if (all_logits) {
        qvk_rec_prep(&R, m->x.buf, D, D, m->norm.buf, 0, qvk_mm_q8(m, m->output, nt), nt);
        qvk_rec_matmul(&R, m->output, QVK_STORE, m->xn.buf, D, m->logits.buf, (uint32_t)m->cfg.vocab_size, nt);
    } else {
        qvk_rec_quant(&R, m->x.buf, (nt - 1) * D, D, m->norm.buf, 0);
        qvk_rec_matvec(&R, m->output, QVK_STORE, 0, m->logits.buf, 0, 0, 0, 0, QVK_EPI_NONE, 0, 0, 0);
    }
    qvk_rec_readback(&R, all_logits ? nt : 1);
    return qvk_rec_end(&R);
}

/* Sampling candidates of the decode step's logits (sample_topk.comp), copied to the host-visible
   readback buffer in place of the logits. */
static void qvk_rec_topk(qvk_rec* R) {
    if (R->rc) return;
    qvk_model* m = R->m;
    qvk_ctx* c = m->c;
    const uint32_t push[2] = {(uint32_t)m->cfg.vocab_size, QVK_SAMPLE_CAP};
    VkBuffer b[QVK_BINDINGS] = {m->logits.buf, m->sample_in.buf, m->sample_out.buf};
    R->label = "sample_topk";
    qvk_rec_dispatch(R, "sample_topk", NULL, 0, b, push, sizeof push, 1, 1, 1, 1);
    if (R->rc) return;
    qvk_barrier(c, R->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT,
                VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_READ_BIT);
    VkBufferCopy region = {0, 0, (VkDeviceSize)QVK_SAMPLE_OUT_WORDS * 4};
    c->f->vkCmdCopyBuffer(R->cb, m->sample_out.buf, m->readback.buf, 1, &region);
    qvk_barrier(c, R->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT, VK_PIPELINE_STAGE_HOST_BIT,
                VK_ACCESS_HOST_READ_BIT);
}

/* Add the last submission's timestamps to the per-label totals (prefill labels start "pp:"). */
static void qvk_profile_collect(qvk_model* m, int decode) {
    uint64_t ts[QVK_PROFILE_MAX];
    if (m->c->f->vkGetQueryPoolResults(m->c->dev, m->qpool, 0, (uint32_t)m->n_ts, sizeof ts, ts, 8,
                                       VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT) != VK_SUCCESS)
        return;
    for (int i = 1; i < m->n_ts; i++) {
        int e = 0;
        while (e < m->n_prof && strcmp(m->prof[e].name, m->ts_label[i])) e++;
        if (e == m->n_prof) {
            if (m->n_prof == (int)(sizeof m->prof / sizeof *m->prof)) continue;
            memset(&m->prof[e], 0, sizeof m->prof[e]);
            snprintf(m->prof[e].name, sizeof m->prof[e].name, "%s", m->ts_label[i]);
            m->n_prof++;
        }
        m->prof[e].ns += (double)(ts[i] - ts[i - 1]) * m->ts_period;
        m->prof[e].calls++;
    }
    if (decode) {
        m->prof_step_ns += (double)(ts[m->n_ts - 1] - ts[0]) * m->ts_period;
        m->prof_steps++;
    } else {
        m->prof_pp_ns += (double)(ts[m->n_ts - 1] - ts[0]) * m->ts_period;
        m->prof_pp_runs++;
    }
}

void qvk_model_prefill_profile(const qvk_model* m, double* ns, long* runs) {
    *ns = m->prof_pp_ns;
    *runs = m->prof_pp_runs;
}

int qvk_model_profile(const qvk_model* m, qvk_profile_entry* out, int cap, double* step_ns, long* steps) {
    int k = m->n_prof < cap ? m->n_prof : cap;
    if (k > 0) memcpy(out, m->prof, (size_t)k * sizeof *out);
    *step_ns = m->prof_step_ns;
    *steps = m->prof_steps;
    return k;
}

/* A step may run: the device was not lost (or made to fail by the test hook). */
static int qvk_step_ready(qvk_model* m, char* err, size_t errlen) {
    if (m->lost) return qvk_fail(err, errlen, QVK_ERR_DEVICE_LOST, "the GPU was lost earlier");
    if (m->fail_after >= 0 && m->n_forward >= m->fail_after) {
        m->lost = 1;
        return qvk_fail(err, errlen, QVK_ERR_DEVICE_LOST, "device lost (simulated by QORA_VK_FAIL=run)");
    }
    return QVK_OK;
}

/* RoPE cos/sin of token row t at position pos, computed exactly as the CPU engine does. */
static void qvk_rope_row(qvk_model* m, int t, int pos) {
    float* cs = m->rope.map;
    const int half = m->cfg.head_dim / 2;
    for (int j = 0; j < half; j++) {
        const float angle = (float)pos * m->inv_freq[j];
        cs[2 * (t * half + j)] = cosf(angle) * m->cfg.rope_scale;
        cs[2 * (t * half + j) + 1] = sinf(angle) * m->cfg.rope_scale;
    }
}

/* One submission: n tokens; the decode step (n == 1) records its logits' copy, or with topk the
   sampling candidates' search, once. The results are in m->readback afterwards. */
static int qvk_step(qvk_model* m, const int32_t* tokens, int n, int start_pos, int all_logits, int topk, char* err,
                    size_t errlen) {
    if (!m || !tokens || n < 1 || start_pos < 0 || n > m->batch || (all_logits && n > m->logit_rows) ||
        (topk && n != 1))
        return qvk_fail(err, errlen, QVK_ERR_ARGS, "bad forward arguments");
    if ((long long)start_pos + n > m->cfg.max_seq_len)
        return qvk_fail(err, errlen, QVK_ERR_ARGS, "positions beyond the %d-token cache", m->cfg.max_seq_len);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size)
            return qvk_fail(err, errlen, QVK_ERR_ARGS, "token id %d out of range", tokens[i]);
    int rc = qvk_step_ready(m, err, errlen);
    if (rc) return rc;
    /* per-step inputs: position, tokens, and RoPE cos/sin computed exactly as the CPU engine does */
    uint32_t* p = m->params.map;
    p[0] = (uint32_t)start_pos;
    p[1] = (uint32_t)n;
    for (int i = 0; i < n; i++) p[4 + i] = (uint32_t)tokens[i];
    for (int t = 0; t < n; t++) qvk_rope_row(m, t, start_pos + t);
    if (n == 1) {
        uint32_t* args = m->att_args.map;
        args[0] = (uint32_t)m->cfg.n_heads / m->att_hg;
        args[1] = qvk_att_chunks(m, (uint32_t)start_pos + 1);
        args[2] = 1;
    }
    VkCommandBuffer cb;
    if (n == 1) {
        cb = topk ? m->cb_decode_topk : m->cb_decode;
        int* recorded = topk ? &m->topk_recorded : &m->decode_recorded;
        if (!*recorded) {
            rc = qvk_record_decode(m, cb, topk, 0, err, errlen);
            if (rc) return rc;
            *recorded = 1;
        }
    } else {
        cb = m->cb_prefill;
        rc = qvk_record_prefill(m, cb, (uint32_t)n, all_logits, err, errlen);
        if (rc) return rc;
    }
    rc = qvk_submit_wait(m->c, cb, err, errlen);
    if (rc) {
        if (rc == QVK_ERR_DEVICE_LOST) m->lost = 1;
        return rc;
    }
    m->n_forward++;
    if (m->qpool && m->n_ts > 1) qvk_profile_collect(m, n == 1);
    return QVK_OK;
}

int qvk_model_forward(qvk_model* m, const int32_t* tokens, int n, int start_pos, float* logits, int all_logits,
                      char* err, size_t errlen) {
    if (!logits) return qvk_fail(err, errlen, QVK_ERR_ARGS, "bad forward arguments");
    const int rc = qvk_step(m, tokens, n, start_pos, all_logits, 0, err, errlen);
    if (rc) return rc;
    const int rows = all_logits ? n : 1;
    memcpy(logits, m->readback.map, (size_t)rows * m->cfg.vocab_size * sizeof(float));
    return QVK_OK;
}

int qvk_model_forward_topk(qvk_model* m, int32_t token, int start_pos, int need, const int32_t* gather, int n_gather,
                           uint32_t* out, char* err, size_t errlen) {
    if (!m || !out || need < 1 || need > QVK_SAMPLE_CAP || n_gather < 0 || n_gather > QVK_SAMPLE_MAX_GATHER ||
        (n_gather && !gather))
        return qvk_fail(err, errlen, QVK_ERR_ARGS, "bad sampling arguments");
    uint32_t* in = m->sample_in.map;
    in[0] = (uint32_t)need;
    in[1] = (uint32_t)n_gather;
    for (int i = 0; i < n_gather; i++) {
        if (gather[i] < 0 || gather[i] >= m->cfg.vocab_size)
            return qvk_fail(err, errlen, QVK_ERR_ARGS, "token id %d out of range", gather[i]);
        in[2 + i] = (uint32_t)gather[i];
    }
    const int rc = qvk_step(m, &token, 1, start_pos, 0, 1, err, errlen);
    if (rc) return rc;
    memcpy(out, m->readback.map, (size_t)QVK_SAMPLE_OUT_WORDS * 4);
    return QVK_OK;
}

int qvk_model_read_logits(qvk_model* m, float* logits, char* err, size_t errlen) {
    if (!m || !logits) return qvk_fail(err, errlen, QVK_ERR_ARGS, "bad arguments");
    if (m->lost) return qvk_fail(err, errlen, QVK_ERR_DEVICE_LOST, "the GPU was lost earlier");
    if (!m->copy_recorded) {
        if (qvk_cmd_begin(m->c, m->cb_copy, 0) != VK_SUCCESS)
            return qvk_fail(err, errlen, QVK_ERR_VK, "vkBeginCommandBuffer failed");
        qvk_rec R = {m, m->cb_copy, err, errlen, 0, 0, NULL};
        qvk_rec_readback(&R, 1);
        if (m->c->f->vkEndCommandBuffer(m->cb_copy) != VK_SUCCESS)
            return qvk_fail(err, errlen, QVK_ERR_VK, "vkEndCommandBuffer failed");
        m->copy_recorded = 1;
    }
    const int rc = qvk_submit_wait(m->c, m->cb_copy, err, errlen);
    if (rc) {
        if (rc == QVK_ERR_DEVICE_LOST) m->lost = 1;
        return rc;
    }
    memcpy(logits, m->readback.map, (size_t)m->cfg.vocab_size * sizeof(float));
    return QVK_OK;
}

/* ================================================================ batched steps over several sequences

   Rows of several sequences in one pass (qora.engine.base: open_slots, forward_batch, copy_slot): the
   products as a prefill's (matmul.comp / matmul_coop.comp over every row: the weights read once per
   step), RoPE and the cache store at each row's own slot row and position (rope_kv.comp ROWMAP), each
   entry's attention over its own slot's first start + n positions (attn_prefill.comp SEG, a
   workgroup z per entry), and the LM head over each entry's last row only (gathered into xg). The
   slots' caches are their own buffers: the single-sequence steps keep theirs (kc, vc). */

/* Forget the cached descriptor sets that bind b before it is freed (a later buffer may get its
   handle); the sets themselves stay in their pool until the model goes. */
static void qvk_sets_forget(qvk_sets* s, VkBuffer b) {
    int k = 0;
    for (int i = 0; i < s->n_sets; i++) {
        int uses = 0;
        for (int j = 0; j < QVK_BINDINGS; j++) uses |= s->sets[i].b[j] == b;
        if (!uses) s->sets[k++] = s->sets[i];
    }
    s->n_sets = k;
}

static void qvk_batch_buffer_free(qvk_model* m, qvk_buffer* b) {
    if (b->buf) qvk_sets_forget(&m->sets, b->buf);
    qvk_buffer_free(m->c, b);
}

static void qvk_batch_free(qvk_model* m) {
    qvk_ctx* c = m->c;
    if (m->layers)
        for (int l = 0; l < m->cfg.n_layers; l++) {
            qvk_layer* L = &m->layers[l];
            for (int s = 0; s < m->n_slots && L->kslot; s++) {
                VkBuffer al[2] = {L->kslot[s], L->vslot[s]};
                for (int i = 0; i < 2; i++)
                    if (al[i]) {
                        qvk_sets_forget(&m->sets, al[i]);
                        c->f->vkDestroyBuffer(c->dev, al[i], NULL);
                    }
            }
            free(L->kslot);
            free(L->vslot);
            L->kslot = L->vslot = NULL;
            qvk_batch_buffer_free(m, &L->kb);
            qvk_batch_buffer_free(m, &L->vb);
        }
    for (int s = 0; s < m->n_slots && m->cb_slot; s++)
        if (m->cb_slot[s]) c->f->vkFreeCommandBuffers(c->dev, c->cmd_pool, 1, &m->cb_slot[s]);
    free(m->cb_slot);
    free(m->slot_recorded);
    m->cb_slot = NULL;
    m->slot_recorded = NULL;
    qvk_buffer* bufs[] = {&m->rowmap, &m->seg, &m->xg, &m->blogits, &m->bread};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) qvk_batch_buffer_free(m, bufs[i]);
    m->n_slots = m->slot_ctx = m->slot_rows = m->b_ents = 0;
}

/* Rows between slots: ctx rounded up so that a slot's bytes are a multiple of 256 (its alias buffer
   then starts where any device may bind one). */
static size_t qvk_slot_rows(const qvk_model* m, int ctx) {
    const size_t row = qvk_kv_row_bytes(m->kv_type, m->kv_dim);
    size_t rows = (size_t)ctx;
    while ((rows * row) % 256) rows++;
    return rows;
}

/* Slot s's rows of a slots' cache buffer as a buffer of its own (bound to the same memory): NULL
   where the device wants another alignment (the one-row step then stays on the batched path). */
static VkBuffer qvk_alias(qvk_ctx* c, const qvk_buffer* b, VkDeviceSize off, VkDeviceSize size) {
    VkBufferCreateInfo bi = {VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
    bi.size = size;
    bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT;
    bi.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
    VkBuffer a = VK_NULL_HANDLE;
    if (c->f->vkCreateBuffer(c->dev, &bi, NULL, &a) != VK_SUCCESS) return VK_NULL_HANDLE;
    VkMemoryRequirements req;
    c->f->vkGetBufferMemoryRequirements(c->dev, a, &req);
    if (off % req.alignment || off + req.size > b->size || c->f->vkBindBufferMemory(c->dev, a, b->mem, off) != VK_SUCCESS) {
        c->f->vkDestroyBuffer(c->dev, a, NULL);
        return VK_NULL_HANDLE;
    }
    return a;
}

/* Every slot's aliases and its (not yet recorded) decode command buffer; slot_decode stays 0 if any fails. */
static void qvk_slot_aliases(qvk_model* m) {
    qvk_ctx* c = m->c;
    const VkDeviceSize bytes = (VkDeviceSize)m->slot_rows * qvk_kv_row_bytes(m->kv_type, m->kv_dim);
    m->cb_slot = calloc((size_t)m->n_slots, sizeof *m->cb_slot);
    m->slot_recorded = calloc((size_t)m->n_slots, sizeof *m->slot_recorded);
    int ok = m->cb_slot && m->slot_recorded;
    for (int l = 0; l < m->cfg.n_layers && ok; l++) {
        qvk_layer* L = &m->layers[l];
        L->kslot = calloc((size_t)m->n_slots, sizeof(VkBuffer));
        L->vslot = calloc((size_t)m->n_slots, sizeof(VkBuffer));
        ok = L->kslot && L->vslot;
        for (int s = 0; s < m->n_slots && ok; s++) {
            L->kslot[s] = qvk_alias(c, &L->kb, (VkDeviceSize)s * bytes, bytes);
            L->vslot[s] = qvk_alias(c, &L->vb, (VkDeviceSize)s * bytes, bytes);
            ok = L->kslot[s] && L->vslot[s];
        }
    }
    m->slot_decode = ok;
}

/* Bytes the slots take: n_slots caches of ctx positions per layer, passes of up to ents entries. */
int qvk_model_batch_bytes(const qvk_model* m, int n_slots, int ctx, int ents, uint64_t* bytes, char* err, size_t n) {
    *bytes = 0;
    if (!m || n_slots < 1 || ctx < 1 || ctx > m->cfg.max_seq_len || ents < 1 || ents > m->batch)
        return qvk_fail(err, n, QVK_ERR_ARGS, "bad slot arguments");
    const size_t range = m->c->info.max_storage_buffer_range;
    const size_t layer = (size_t)n_slots * qvk_slot_rows(m, ctx) * qvk_kv_row_bytes(m->kv_type, m->kv_dim);
    if (layer > range)
        return qvk_fail(err, n, QVK_ERR_UNSUPPORTED, "%d sequences of %d tokens: a KV cache layer of %.0f MB exceeds "
                        "the device's %.0f MB storage-buffer limit", n_slots, ctx, (double)layer / 1e6, (double)range / 1e6);
    const size_t V = (size_t)m->cfg.vocab_size, D = (size_t)m->cfg.dim;
    if ((size_t)ents * V * 4 > range)
        return qvk_fail(err, n, QVK_ERR_UNSUPPORTED, "the logits of %d sequences exceed a storage buffer", ents);
    *bytes = 2 * (uint64_t)m->cfg.n_layers * (layer + 256) + (uint64_t)ents * (D + 2 * V) * 4 +
             (uint64_t)m->batch * 4 + (uint64_t)ents * 16 + 5 * 256;
    return QVK_OK;
}

int qvk_model_open_batch(qvk_model* m, int n_slots, int ctx, int ents, char* err, size_t n) {
    uint64_t bytes;
    int rc = qvk_model_batch_bytes(m, n_slots, ctx, ents, &bytes, err, n);
    if (rc) return rc;
    qvk_batch_free(m);
    qvk_ctx* c = m->c;
    const size_t layer = (size_t)n_slots * qvk_slot_rows(m, ctx) * qvk_kv_row_bytes(m->kv_type, m->kv_dim);
    const size_t V = (size_t)m->cfg.vocab_size, D = (size_t)m->cfg.dim;
    for (int l = 0; l < m->cfg.n_layers && !rc; l++) {
        rc = qvk_buffer_new(c, layer, QVK_MEM_DEVICE, &m->layers[l].kb, err, n);
        if (!rc) rc = qvk_buffer_new(c, layer, QVK_MEM_DEVICE, &m->layers[l].vb, err, n);
    }
    if (!rc) rc = qvk_buffer_new(c, (size_t)m->batch * 4, QVK_MEM_UPLOAD, &m->rowmap, err, n);
    if (!rc) rc = qvk_buffer_new(c, (size_t)ents * 16, QVK_MEM_UPLOAD, &m->seg, err, n);
    if (!rc) rc = qvk_buffer_new(c, (size_t)ents * D * 4, QVK_MEM_DEVICE, &m->xg, err, n);
    if (!rc) rc = qvk_buffer_new(c, (size_t)ents * V * 4, QVK_MEM_DEVICE, &m->blogits, err, n);
    if (!rc) rc = qvk_buffer_new(c, (size_t)ents * V * 4, QVK_MEM_READBACK, &m->bread, err, n);
    if (rc) {
        qvk_batch_free(m);
        return rc;
    }
    m->n_slots = n_slots, m->slot_ctx = ctx, m->b_ents = ents, m->slot_rows = (int)qvk_slot_rows(m, ctx);
    qvk_slot_aliases(m);
    return QVK_OK;
}

int qvk_model_slots(const qvk_model* m) { return m->n_slots; }

/* Each entry's last row of the residual stream into row e of xg, for the LM head. */
static void qvk_rec_gather(qvk_rec* R, uint32_t n_ent) {
    if (R->rc) return;
    qvk_model* m = R->m;
    qvk_ctx* c = m->c;
    VkBufferCopy* regions = malloc((size_t)n_ent * sizeof *regions);
    if (!regions) {
        R->rc = qvk_fail(R->err, R->n, QVK_ERR_OOM, "out of host memory");
        return;
    }
    const uint32_t* sg = m->seg.map;
    const VkDeviceSize row = (VkDeviceSize)m->cfg.dim * 4;
    for (uint32_t e = 0; e < n_ent; e++)
        regions[e] = (VkBufferCopy){(sg[4 * e + 2] + sg[4 * e + 1] - 1) * row, e * row, row};
    qvk_barrier(c, R->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT,
                VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_READ_BIT);
    c->f->vkCmdCopyBuffer(R->cb, m->x.buf, m->xg.buf, n_ent, regions);
    qvk_barrier(c, R->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT,
                VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_READ_BIT);
    free(regions);
}

/* The batched step over nt rows of n_ent entries (the tables are filled): logits of each entry's last row. */
static int qvk_record_batch(qvk_model* m, VkCommandBuffer cb, uint32_t nt, uint32_t n_ent, char* err, size_t n) {
    qvk_rec R = {m, cb, err, n, 0, m->qpool != VK_NULL_HANDLE, NULL, VK_NULL_HANDLE, 1};
    const uint32_t D = (uint32_t)m->cfg.dim;
    const int rc = qvk_rec_rows(&R, nt);
    if (rc) return rc;
    qvk_rec_gather(&R, n_ent);
    R.label = "pp:lm_head";
    qvk_rec_prep(&R, m->xg.buf, D, D, m->norm.buf, 0, qvk_mm_q8(m, m->output, n_ent), n_ent);
    qvk_rec_matmul(&R, m->output, QVK_STORE, m->xn.buf, D, m->blogits.buf, (uint32_t)m->cfg.vocab_size, n_ent);
    qvk_rec_copy_back(&R, m->blogits.buf, m->bread.buf, n_ent);
    return qvk_rec_end(&R);
}

/* The step's tables: tokens, RoPE and cache row per row, the entries; checked against the slots. */
static int qvk_batch_tables(qvk_model* m, const int32_t* tokens, int n_rows, const int32_t* ents, int n_ent, char* err,
                            size_t n) {
    uint32_t *p = m->params.map, *rowmap = m->rowmap.map, *sg = m->seg.map;
    int row = 0;
    m->b_max_n = 0;
    for (int e = 0; e < n_ent; e++) {
        const int slot = ents[3 * e], start = ents[3 * e + 1], cnt = ents[3 * e + 2];
        if (slot < 0 || slot >= m->n_slots || start < 0 || cnt < 1 || cnt > n_rows - row ||
            (long long)start + cnt > m->slot_ctx)
            return qvk_fail(err, n, QVK_ERR_ARGS, "bad batch entry %d (slot %d, positions %d..%d)", e, slot, start,
                            start + cnt - 1);
        const uint32_t base = (uint32_t)slot * (uint32_t)m->slot_rows;
        sg[4 * e] = (uint32_t)start, sg[4 * e + 1] = (uint32_t)cnt, sg[4 * e + 2] = (uint32_t)row, sg[4 * e + 3] = base;
        if ((uint32_t)cnt > m->b_max_n) m->b_max_n = (uint32_t)cnt;
        for (int t = 0; t < cnt; t++, row++) {
            if (tokens[row] < 0 || tokens[row] >= m->cfg.vocab_size)
                return qvk_fail(err, n, QVK_ERR_ARGS, "token id %d out of range", tokens[row]);
            p[4 + row] = (uint32_t)tokens[row];
            rowmap[row] = base + (uint32_t)(start + t);
            qvk_rope_row(m, row, start + t);
        }
    }
    if (row != n_rows) return qvk_fail(err, n, QVK_ERR_ARGS, "the entries hold %d rows, not %d", row, n_rows);
    p[0] = 0, p[1] = (uint32_t)n_rows;
    m->b_n_ent = (uint32_t)n_ent;
    return QVK_OK;
}

/* One decode row of slot `slot` at pos (the tables are filled): the single-sequence decode step over the
   slot's aliases, as fast as `forward` of one token (the batched path's products and attention are
   made for many rows). */
static int qvk_slot_step(qvk_model* m, int slot, int pos, float* logits, char* err, size_t n) {
    uint32_t* p = m->params.map;
    p[0] = (uint32_t)pos, p[1] = 1;
    uint32_t* args = m->att_args.map;
    args[0] = (uint32_t)m->cfg.n_heads / m->att_hg;
    args[1] = qvk_att_chunks(m, (uint32_t)pos + 1);
    args[2] = 1;
    if (!m->cb_slot[slot]) m->cb_slot[slot] = qvk_cmd_new(m->c);
    if (!m->cb_slot[slot]) return qvk_fail(err, n, QVK_ERR_VK, "vkAllocateCommandBuffers failed");
    int rc = QVK_OK;
    if (!m->slot_recorded[slot]) {
        rc = qvk_record_decode(m, m->cb_slot[slot], 0, slot + 1, err, n);
        m->slot_recorded[slot] = !rc;
    }
    if (!rc) rc = qvk_submit_wait(m->c, m->cb_slot[slot], err, n);
    if (rc) {
        if (rc == QVK_ERR_DEVICE_LOST) m->lost = 1;
        return rc;
    }
    m->n_forward++;
    if (m->qpool && m->n_ts > 1) qvk_profile_collect(m, 1);
    memcpy(logits, m->readback.map, (size_t)m->cfg.vocab_size * sizeof(float));
    return QVK_OK;
}

void qvk_model_set_slot_decode(qvk_model* m, int rows) { m->use_slot_decode = rows > 0 ? rows : 0; }

int qvk_model_forward_batch(qvk_model* m, const int32_t* tokens, int n_rows, const int32_t* ents, int n_ent,
                            float* logits, char* err, size_t n) {
    if (!m || !tokens || !ents || !logits || n_rows < 1 || n_rows > m->batch || n_ent < 1)
        return qvk_fail(err, n, QVK_ERR_ARGS, "bad batch arguments");
    if (!m->n_slots) return qvk_fail(err, n, QVK_ERR_ARGS, "no sequence slots are open");
    if (n_ent > m->b_ents) return qvk_fail(err, n, QVK_ERR_ARGS, "%d entries, at most %d per pass", n_ent, m->b_ents);
    int rc = qvk_step_ready(m, err, n);
    if (!rc) rc = qvk_batch_tables(m, tokens, n_rows, ents, n_ent, err, n);
    /* a step of decode rows only (one token per entry: n_rows == n_ent), at most use_slot_decode of them:
       each the single-sequence decode step over its slot. The batched path's products are made for many
       rows (64-row tiles, the LM head as a matrix product): on an H100 a step of 8 decode rows cost it
       about as much as 25 decode steps (serve_load, bench/NOTES.md), so a few rows go faster one by one. */
    if (!rc && n_rows == n_ent && n_rows <= m->use_slot_decode && m->slot_decode) {
        uint32_t* p = m->params.map;
        for (int e = 0; e < n_ent && !rc; e++) { /* the decode step reads row 0 of the tables: this row's */
            p[4] = (uint32_t)tokens[e];
            qvk_rope_row(m, 0, ents[3 * e + 1]);
            rc = qvk_slot_step(m, ents[3 * e], ents[3 * e + 1], logits + (size_t)e * m->cfg.vocab_size, err, n);
        }
        return rc;
    }
    if (!rc) rc = qvk_record_batch(m, m->cb_prefill, (uint32_t)n_rows, (uint32_t)n_ent, err, n);
    if (!rc) rc = qvk_submit_wait(m->c, m->cb_prefill, err, n);
    if (rc) {
        if (rc == QVK_ERR_DEVICE_LOST) m->lost = 1;
        return rc;
    }
    m->n_forward++;
    if (m->qpool && m->n_ts > 1) qvk_profile_collect(m, 0);
    memcpy(logits, m->bread.map, (size_t)n_ent * m->cfg.vocab_size * sizeof(float));
    return QVK_OK;
}

/* Positions 0..n_pos-1 of slot src's cache (every layer) copied to slot dst. */
int qvk_model_copy_slot(qvk_model* m, int src, int dst, int n_pos, char* err, size_t n) {
    if (!m || src < 0 || dst < 0 || src >= m->n_slots || dst >= m->n_slots || n_pos < 0 || n_pos > m->slot_ctx)
        return qvk_fail(err, n, QVK_ERR_ARGS, "bad slot copy arguments");
    if (m->lost) return qvk_fail(err, n, QVK_ERR_DEVICE_LOST, "the GPU was lost earlier");
    if (src == dst || n_pos == 0) return QVK_OK;
    qvk_ctx* c = m->c;
    VkCommandBuffer cb = m->cb_prefill;
    if (qvk_cmd_begin(c, cb, 1) != VK_SUCCESS) return qvk_fail(err, n, QVK_ERR_VK, "vkBeginCommandBuffer failed");
    const VkDeviceSize row = qvk_kv_row_bytes(m->kv_type, m->kv_dim), slot = row * (VkDeviceSize)m->slot_rows;
    VkBufferCopy region = {(VkDeviceSize)src * slot, (VkDeviceSize)dst * slot, (VkDeviceSize)n_pos * row};
    qvk_barrier(c, cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT, VK_PIPELINE_STAGE_TRANSFER_BIT,
                VK_ACCESS_TRANSFER_READ_BIT);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        c->f->vkCmdCopyBuffer(cb, m->layers[l].kb.buf, m->layers[l].kb.buf, 1, &region);
        c->f->vkCmdCopyBuffer(cb, m->layers[l].vb.buf, m->layers[l].vb.buf, 1, &region);
    }
    qvk_barrier(c, cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
                VK_ACCESS_SHADER_READ_BIT);
    if (c->f->vkEndCommandBuffer(cb) != VK_SUCCESS) return qvk_fail(err, n, QVK_ERR_VK, "vkEndCommandBuffer failed");
    const int rc = qvk_submit_wait(c, cb, err, n);
    if (rc == QVK_ERR_DEVICE_LOST) m->lost = 1;
    return rc;
}
